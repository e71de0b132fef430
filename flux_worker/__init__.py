"""What runs on a GPU: model presets and loading, the offline model builder, the renderer actor."""

import logging as _logging

# torchao (the fp8 fast path) tries to load its CUDA kernels whenever diffusers imports it and logs a
# warning per kernel on machines without them; torch logs deprecations of torchao's registrations.
# None of it is actionable for a user, and it buries the progress bar, so only errors get through.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
