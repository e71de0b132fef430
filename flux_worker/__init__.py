"""What runs on a GPU: model presets and loading, the offline model builder, the renderer actor."""
