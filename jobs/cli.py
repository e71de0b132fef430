"""The `fluxbatch` command line: demo, render, validate, verify, compact, failures, provenance, model build, plan.

Every subcommand fills a `JobSpec` (from --job YAML, then flags) and calls the same Python API.
User errors print one line saying what to fix and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any

from pydantic import ValidationError

EXAMPLES = """examples:
  fluxbatch demo
  fluxbatch model build ./models/tiny --size tiny
  fluxbatch validate prompts.parquet --model flux.1-dev
  fluxbatch render prompts.parquet s3://bucket/run1 --model flux.1-dev --replicas 8 --gpus-per-replica 1
  fluxbatch failures s3://bucket/run1
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 fluxbatch render s3://in/m.parquet s3://out/run1 --model ./models/tiny
"""


# Flags every subcommand takes, before or after its name (CommandParser adds them to each).
GLOBAL_FLAGS = ("-v", "--verbose")


class CommandParser(argparse.ArgumentParser):
    """A parser whose subcommands (argparse builds them with the parent's class) all take the global flags, so
    `fluxbatch render ... -v` works as well as `fluxbatch -v render ...`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand given no -v leaves what the main parser (or another level) set.
        self.add_argument(*GLOBAL_FLAGS, action="store_true", default=argparse.SUPPRESS,
                          help="show INFO logs, the libraries' own output, and the traceback of an error")

    def error(self, message: str) -> typing.NoReturn:
        """A usage error in one line, like every other mistake (argparse would print the whole usage first)."""
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")

    def add_commands(self, dest: str, metavar: str) -> Any:
        """`add_subparsers`, remembered, so that a mistyped flag is named by the innermost command's parser."""
        sub = self.add_subparsers(dest=dest, required=True, metavar=metavar)
        self.commands = (dest, sub.choices)
        return sub

    def refuse_unknown(self, args: argparse.Namespace, extras: list[str]) -> typing.NoReturn:
        """Arguments the command does not take, with the flag a mistyped one resembles."""
        import difflib
        import re

        parser = self
        while getattr(parser, "commands", None):
            dest, choices = parser.commands
            parser = choices[getattr(args, dest)]
        known = sorted(set(re.findall(r"(?<![\w-])--[a-z][\w-]*", parser.format_help())))
        guesses = [(word, near[0]) for word in extras if word.startswith("--")
                   for near in [difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)] if near]
        hint = ""
        if len(guesses) == 1:
            hint = f" (did you mean {guesses[0][1]}?)"
        elif guesses:
            hint = " (did you mean " + ", ".join(f"{near} for {word}" for word, near in guesses) + "?)"
        parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fluxbatch")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def _add_job_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...] = ("",)) -> None:
    """--job, --storage-option, and the flags generated from JobSpec (jobs/flags.py) for the fields under `fields`."""
    from jobs.flags import add_job_flags
    from jobs.storage_options import add_storage_option_flag

    parser.add_argument("--job", metavar="JOB.yaml", help="job spec in YAML; the command line overrides it")
    add_storage_option_flag(parser)
    add_job_flags(parser, fields)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fluxbatch",
        description="Batch-render FLUX text-to-image models over Parquet prompt manifests on Ray.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluxbatch {_version()}")
    sub = parser.add_commands("command", "COMMAND")

    demo = sub.add_parser("demo", help="render an example manifest with the offline model (no GPU, no network)",
                          description="Build the offline random-weight model, write an example manifest "
                          "and render it on a local Ray cluster.")
    demo.add_argument("output", nargs="?", default="demo-output", help="output folder (default: demo-output)")

    render = sub.add_parser("render", help="render a manifest to OUTPUT",
                            description="Render every image of MANIFEST that OUTPUT does not hold yet. "
                            "MANIFEST and OUTPUT may come from --job instead (`manifest:`, `output:`).")
    # Optional here so `--job job.yaml` alone is enough; job_from_args says which one is missing.
    render.add_argument("manifest", nargs="?", metavar="MANIFEST",
                        help="Parquet file, folder or glob; local path or s3:// (job file: manifest)")
    render.add_argument("output", nargs="?", metavar="OUTPUT",
                        help="output folder or s3:// prefix (job file: output.uri)")
    _add_job_flags(render)
    render.add_argument("--new-version", action="store_true",
                        help="if the job's parameters differ from every version in OUTPUT, render a new version "
                        "into OUTPUT/_versions/<n>/ instead of refusing")
    render.add_argument("--allow-non-empty-output", action="store_true",
                        help="render into an OUTPUT that holds other files and no _job.json (refused otherwise); "
                        "fluxbatch never touches those files")
    render.add_argument("--rerender-changed", action="store_true",
                        help="render again the rows whose parameters (prompt, size, steps, seed, ...) changed since "
                        "their images were committed, replacing those images and ledger rows (refused otherwise)")
    render.add_argument("--no-progress", action="store_true", help="no progress bar")

    validate = sub.add_parser("validate", help="check a manifest; print each bad row with its reason",
                              description="Read and validate MANIFEST; exit 1 if any row is bad.")
    validate.add_argument("manifest", nargs="?", metavar="MANIFEST",
                          help="Parquet file, folder or glob; local path or s3:// (job file: manifest)")
    # A row's size limits and adapter names come from the model (and a watermark's smallest image); its reference
    # images must lie in the roots.
    _add_job_flags(validate, ("model.", "reference_roots", "provenance.watermark", "defaults.candidates", "quality."))

    from jobs.storage_options import add_storage_option_flag

    verify = sub.add_parser("verify", help="check OUTPUT's ledger against its images; --repair puts it right",
                            description="Check every metadata part is readable, every row's image exists with its "
                            "sha256 and size, no key is recorded twice and no image lacks a row, in OUTPUT and each "
                            "of its versions. Exit 1 on any problem.")
    verify.add_argument("output", help="output folder or s3:// prefix")
    verify.add_argument("--repair", action="store_true",
                        help="move unreadable parts and orphan or altered images aside into OUTPUT/_quarantine/, "
                        "drop duplicate rows and rows without their image (those keys render again next run)")
    verify.add_argument("--provenance", action="store_true",
                        help="also read each image's marks back (XMP, C2PA validation, watermark bits) and name every "
                        "image lacking what its ledger row records, or recording none")
    from schemas.quality import DEFAULT_DUPLICATE_DISTANCE

    verify.add_argument("--duplicate-distance", type=_bits, default=DEFAULT_DUPLICATE_DISTANCE, metavar="BITS",
                        help="list groups of images whose perceptual hashes differ in at most BITS of 64 (0-8, "
                        f"default {DEFAULT_DUPLICATE_DISTANCE}) as near-duplicates; nothing is done to them")
    add_storage_option_flag(verify)

    marks = sub.add_parser("provenance", help="show the provenance marks of image files (any, not only OUTPUT's)",
                           description="Print what each image says about itself: its XMP digital source type, "
                           "creator tool and model, whether its C2PA manifest validates, and with --watermark whether "
                           "that watermark reads back. Exit 1 if an image carries no mark saying it is AI-generated, "
                           "or changed since its C2PA manifest was signed.")
    marks.add_argument("images", nargs="+", metavar="IMAGE", help="image file or URL (s3://...)")
    marks.add_argument("--watermark", metavar="TEXT", help="also look for this invisible watermark (the job's text)")
    add_storage_option_flag(marks)

    compact = sub.add_parser("compact", help="merge OUTPUT's small metadata parts into few large ones",
                             description="Merge the small metadata parts of OUTPUT (and of each version) into parts "
                             "of up to a million rows, one row per key, under OUTPUT's lease: the start of every later "
                             "run reads fewer, larger parts. Runs do this themselves once 16 small parts pile up; "
                             "nothing renders, no image is touched.")
    compact.add_argument("output", help="output folder or s3:// prefix")
    add_storage_option_flag(compact)

    failures = sub.add_parser("failures", help="list the failure rows of OUTPUT's last run",
                              description="List the failure rows of OUTPUT's last run (bad manifest rows, images that "
                              "failed to render or write, committed images found missing): source file, row, id, "
                              "field and reason, most recent run only.")
    failures.add_argument("output", help="output folder or s3:// prefix")
    failures.add_argument("--limit", type=_positive, default=50, help="rows to show (default 50)")
    failures.add_argument("--json", action="store_true", help="a JSON array of the rows instead of a table")
    add_storage_option_flag(failures)

    model = sub.add_parser("model", help="model tools", description="Model tools.")
    model_sub = model.add_commands("model_command", "SUBCOMMAND")
    build = model_sub.add_parser("build", help="write a random-weight Flux pipeline (diffusers folder format)",
                                 description="Write a random-weight Flux pipeline, loadable with "
                                 "FluxPipeline.from_pretrained(PATH), built offline.")
    build.add_argument("path", help="folder to write")
    mirror = model_sub.add_parser(
        "mirror", help="copy a model (preset, hub id, folder or URL) to a storage URL, with a checksum file",
        description="Copy a diffusers pipeline (a preset or hub id at --revision, a local folder, or a model URL) "
        "to DEST (any fsspec URL or a folder), safetensors only, with fluxbatch-checksums.json written last. "
        "Renders then take DEST as --model; each node fetches it once. Run again to resume a mirror cut short.")
    mirror.add_argument("source", metavar="SOURCE", help="preset, hub id, local folder or model URL")
    mirror.add_argument("dest", metavar="DEST", help="where to copy it: s3://bucket/models/NAME, or a folder")
    mirror.add_argument("--revision", help="the hub revision (commit, branch or tag) of a preset or hub id SOURCE")
    add_storage_option_flag(mirror)
    build.add_argument("--size", choices=["tiny", "bench", "full"], default="tiny",
                       help="tiny: milliseconds per image, for tests; bench: ~0.2-0.5 s per image on 2 CPU cores; "
                            "full: the real FLUX.1 architecture (~34 GB, made on a GPU if there is one), for GPU "
                            "benchmarks")
    build.add_argument("--variant", choices=["schnell", "dev"], default="dev",
                       help="--size full: FLUX.1-schnell or -dev (guidance embedding, 28 steps); default dev")
    build.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    from flux_worker.families import FAMILIES  # the model table; imports no torch

    build.add_argument("--family", choices=list(FAMILIES), default="flux.1",
                       help="which pipeline to build: " + ", ".join(f"{f.name} ({f.pipeline_class})"
                                                                     for f in FAMILIES.values()))
    build.add_argument("--scorer", choices=["clip", "aesthetic"],
                       help="build a scorer instead of a pipeline (--clip, --aesthetic): a CLIP model, or a LAION "
                            "aesthetic predictor for the CLIP model of the same --size (full: ViT-L/14's shapes)")

    from jobs.dataset_commands import add_parsers

    add_parsers(sub)  # synthesize, catalog run
    from jobs.cluster_commands import add_parsers as add_cluster_parsers

    add_cluster_parsers(sub)  # submit, schedule
    from jobs.k8s import add_parsers as add_k8s_parser

    add_k8s_parser(sub)  # k8s: the RayJob / RayCronJob of a command
    sub.add_parser("plan", help="memory planner: tensor-parallel degree and placement for a GPU size",
                   add_help=False)
    return parser


def job_from_args(args: argparse.Namespace) -> Any:
    """A JobSpec from --job (if given), then the positionals, then every flag the user set, each winning over the last.

    Every mistake is one line naming the flag or the job file at fault (schemas/overrides.py).
    """
    from jobs.errors import UsageError
    from jobs.flags import flags_as_typed, job_overrides
    from jobs.storage_options import apply_storage_options, check_storage_options
    from schemas import JobSpec
    from schemas.overrides import apply_overrides, spec_data, validate_spec

    data = spec_data(args.job, "job", {}) if args.job else {}
    manifest, output = args.manifest, getattr(args, "output", None)
    if args.command == "validate":
        output = "memory://unused"  # validate writes nothing
    elif output is None and manifest is not None and "manifest" in data and not _output_uri(data):
        manifest, output = None, manifest  # `render --job job.yaml OUT`: the file names the manifest, not the output
    apply_overrides(data, {"manifest": manifest, "output.uri": output, **job_overrides(args)}, args.job)
    where = f"in {args.job}" if args.job else "in a --job file"
    if not data.get("manifest"):
        raise UsageError(f"{args.command}: no manifest; give MANIFEST on the command line or `manifest:` {where}")
    if not _output_uri(data):
        raise UsageError(f"{args.command}: no output; give OUTPUT on the command line or `output: {{uri: ...}}` "
                         f"{where}")
    # A positional's mistake is named as a flag's is: `OUTPUT s4://x: unknown protocol ...`.
    typed = {"manifest": f"MANIFEST {manifest}" if manifest else None,
             "output.uri": f"OUTPUT {output}" if output and args.command != "validate" else None}
    job = validate_spec(JobSpec, data, source=args.job,
                        flags={**{field: word for field, word in typed.items() if word}, **flags_as_typed(args)})
    check_storage_options(args.storage_option, [job.manifest, job.output.uri, *job.reference_roots])
    return apply_storage_options(job, args.storage_option)


def check_model_defaults(args: argparse.Namespace, job: Any) -> Any:
    """The preset of the job's model, once each of the job's defaults is known to obey the rule of a manifest row
    with the model's limits; a bad one is named by its flag, else the job file and the field (README, "Flags and
    job files"), before anything is written. A model that is no preset, folder or hub id is refused here too."""
    from flux_worker.presets import resolve_preset
    from jobs.flags import flags_as_typed
    from schemas.job import check_defaults

    preset = resolve_preset(job.model.name, job.storage_options)
    check_defaults(job, job.row_limits(preset.limits), source=args.job, flags=flags_as_typed(args))
    return preset


def named_fields(args: argparse.Namespace) -> dict[str, str]:
    """How the user gave the job's resource fields, for a refusal to name: the flag as typed, else the job file."""
    from jobs.flags import flags_as_typed

    from_file = {field: f"{field} in {args.job}" for field in ("gpus_per_replica", "cpus_per_replica")} \
        if args.job else {}
    return {**from_file, **{field: typed.split()[0] for field, typed in flags_as_typed(args).items()}}


def _output_uri(data: dict[str, Any]) -> Any:
    output = data.get("output")
    return output.get("uri") if isinstance(output, dict) else output


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.manifest import VALIDATE_COLUMNS, read_manifest
    from pipeline.references import check_manifest
    from pipeline.scorer_check import check_scorers

    job = job_from_args(args)
    preset = check_model_defaults(args, job)
    check_scorers(job)  # as render checks them: a missing or mismatched scorer is one line here too
    # Each bad row is printed as the reader finds it, never collected: memory stays flat however many there are.
    manifest = read_manifest(job.manifest, job.storage_options, limits=job.row_limits(preset.limits),
                             model_name=job.model.name, adapter_names=set(job.model.adapters), sink=_print_failure,
                             columns=VALIDATE_COLUMNS)
    # Reference images are listed and read as `render` reads them on the driver (one listing per folder).
    check_manifest(manifest, job, sink=_print_failure, tensor_parallel=job.most_gpus_per_replica() > 1)
    images = manifest.image_count  # counted by columns: no per-row objects for a million-row manifest
    print(f"{len(manifest.files)} file(s), {manifest.total_rows} rows: {manifest.valid_count} valid "
          f"({images} images), {manifest.failures.rows} bad", file=sys.stderr)
    if manifest.failures.rows:  # as pandas numbers them, so `pd.read_parquet(file).iloc[row]` is the row printed
        print("rows are counted from 0, as pandas counts them", file=sys.stderr)
    if not manifest.valid_count:
        print("no valid row: a render of this manifest would render nothing and exit 1", file=sys.stderr)
    # The exit code `render` would give if every image renders (README, "Exit codes").
    return 0 if manifest.valid_count and not manifest.failures.total else 1


def _print_failure(failure: Any) -> None:
    where = f"{failure.source}" + (f" row {failure.row}" if failure.row is not None else "")
    ident = f" (id {failure.request_id!r})" if failure.request_id else ""
    field = f" field {failure.field!r}:" if failure.field else ""
    print(f"{where}{ident}:{field} {failure.reason}")


def cmd_render(args: argparse.Namespace) -> int:
    from jobs.terminal import summary_lines
    from pipeline import render

    job = job_from_args(args)
    check_model_defaults(args, job)  # the pre-flight checks them again, naming no flag (the Python API's)
    summary = render(job, new_version=args.new_version, allow_non_empty_output=args.allow_non_empty_output,
                     rerender_changed=args.rerender_changed, progress=not args.no_progress, named=named_fields(args))
    print("\n".join(summary_lines(summary)))  # jobs/terminal.py
    return 0 if summary.succeeded else 1  # README, "Exit codes"


def _bits(text: str) -> int:
    from schemas.quality import MAX_DUPLICATE_DISTANCE

    if not text.isdigit() or int(text) > MAX_DUPLICATE_DISTANCE:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of bits, 0 to {MAX_DUPLICATE_DISTANCE}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of 1 or more")
    return int(text)


def cmd_failures(args: argparse.Namespace) -> int:
    """`fluxbatch failures OUTPUT`: the failure rows of OUTPUT's last run, as a table or JSON."""
    import json

    from flux_worker.storage import filesystem
    from jobs.errors import UsageError
    from jobs.terminal import failure_table
    from pipeline.store import ledger
    from schemas.layout import JOB_FILE

    fs, root = filesystem(args.output, _url_storage_options(args, {"OUTPUT": args.output}))
    if not fs.exists(f"{root}/{JOB_FILE}"):
        raise UsageError(f"OUTPUT {args.output}: no {JOB_FILE} there, so no fluxbatch run wrote it")
    table, total = ledger.first_failures(fs, root, args.limit)
    rows = [{"source": r.get("source"), "row": r.get("row"), "id": r.get("request_id"), "key": r.get("key"),
             "stage": r.get("stage"), "field": r.get("field"), "reason": r.get("reason")}
            for r in (table.to_pylist() if table is not None else [])]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    elif rows:
        print(failure_table(rows))
    shown = f"{len(rows)} of {total}" if len(rows) < total else f"{total}"
    more = f"; --limit {total} shows them all" if len(rows) < total else ""
    print(f"{shown} failure rows in {fs.uri(root)}{more}", file=sys.stderr)
    return 0


def _url_storage_options(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    """The fsspec options for a command's URLs (`urls`: OUTPUT of `verify` and `failures`, SOURCE and DEST of
    `model mirror`), once each URL and every --storage-option are known to be well formed: a mistake in either
    is one line naming it, before any storage is asked."""
    from jobs.errors import UsageError
    from jobs.storage_options import check_storage_options, parse_storage_options
    from schemas.urls import storage_url

    for label, url in urls.items():
        try:
            storage_url(url)
        except ValueError as error:
            raise UsageError(f"{label} {url}: {error}") from None
    check_storage_options(args.storage_option, list(urls.values()))
    return parse_storage_options(args.storage_option)


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.store.verify import verify_output

    result = verify_output(args.output, _url_storage_options(args, {"OUTPUT": args.output}), repair=args.repair,
                           provenance=args.provenance, duplicate_distance=args.duplicate_distance)
    print(result.report())
    return 1 if (result.problems and not args.repair) or result.unmarked else 0


def cmd_compact(args: argparse.Namespace) -> int:
    from flux_worker.storage import filesystem
    from pipeline.store.compaction import compact_output

    options = _url_storage_options(args, {"OUTPUT": args.output})
    fs, _ = filesystem(args.output, options)
    for result in compact_output(args.output, options):
        print(result.line(fs))
    return 0


def cmd_provenance(args: argparse.Namespace) -> int:
    from PIL import UnidentifiedImageError

    from flux_worker.storage import filesystem
    from pipeline.store.provenance_check import image_marks
    from schemas.errors import first_line

    failing = 0
    options = _url_storage_options(args, {f"IMAGE {number}": url for number, url in enumerate(args.images, 1)})
    for url in args.images:
        fs, path = filesystem(url, options)
        try:
            lines, marked, tampered = image_marks(fs.read_bytes(path), args.watermark)
        except FileNotFoundError:
            lines, marked, tampered = ["no such file"], False, False
        except (UnidentifiedImageError, OSError) as error:
            why = "Pillow cannot read it" if isinstance(error, UnidentifiedImageError) else first_line(error)
            lines, marked, tampered = [f"not an image ({why})"], False, False
        failing += tampered or not marked
        verdict = "marked as AI-generated" if marked else "NOT marked as AI-generated"
        print(f"{url}: {verdict}" + (", and changed since its C2PA manifest was signed" if tampered else ""))
        print("\n".join(f"  {line}" for line in lines))
    return 1 if failing else 0


def cmd_model_build(args: argparse.Namespace) -> int:
    from flux_worker.model_build import build_full_model, build_model
    from jobs.errors import UsageError

    if args.scorer:
        from flux_worker.scorer_build import build_scorer

        folder = build_scorer(args.path, args.scorer, args.size, args.seed)
        print(f"wrote a random-weight {args.size} {args.scorer} scorer to {folder}")
        return 0
    if args.size == "full":
        if args.family != "flux.1":
            raise UsageError(f"--size full builds FLUX.1 only (schnell or dev), not {args.family}")
        folder = build_full_model(args.path, args.variant, seed=args.seed)
        print(f"wrote a random-weight full-size FLUX.1-{args.variant} pipeline to {folder}")
        return 0
    folder = build_model(args.path, args.size, args.seed, family=args.family)
    print(f"wrote a random-weight {args.size} {args.family} pipeline to {folder}")
    return 0


def cmd_model_mirror(args: argparse.Namespace) -> int:
    from flux_worker.model_folder import is_model_url
    from flux_worker.model_mirror import mirror

    urls = {"DEST": args.dest, **({"SOURCE": args.source} if is_model_url(args.source) else {})}
    done = mirror(args.source, args.dest, revision=args.revision, storage_options=_url_storage_options(args, urls))
    print(f"mirrored {args.source} to {args.dest}: {done.files} files, {done.bytes / 2**30:.2f} GiB "
          f"({done.copied} copied, {done.files - done.copied} already there) in {done.seconds:.1f} s; "
          f"render with --model {args.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `fluxbatch` console script."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [word for word in argv if word not in GLOBAL_FLAGS]
    if words and words[0] == "plan":  # the planner parses its own flags (jobs/plan_command.py)
        from jobs.plan_command import plan_main

        return plan_main(words[1:])
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # named by the subcommand's parser, which knows its own flags (argparse would use the top one)
        parser.refuse_unknown(args, extras)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    from jobs.errors import USER_ERRORS

    try:
        if args.command == "demo":
            from jobs.demo import run_demo

            return run_demo(args.output)
        if args.command == "render":
            return cmd_render(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "failures":
            return cmd_failures(args)
        if args.command == "compact":
            return cmd_compact(args)
        if args.command == "provenance":
            return cmd_provenance(args)
        if args.command == "model" and args.model_command == "mirror":
            return cmd_model_mirror(args)
        if args.command == "model":
            return cmd_model_build(args)
        if args.command in ("submit", "schedule"):
            from jobs.cluster_commands import run_command as run_cluster_command

            return run_cluster_command(args)
        if args.command == "k8s":
            from jobs.k8s import run_command as run_k8s_command

            return run_k8s_command(args)
        if args.command in ("synthesize", "catalog"):
            from jobs.dataset_commands import run_command

            return run_command(args)
    except ValidationError as error:
        from schemas import row_errors

        _traceback_if(verbose)
        for item in row_errors(error):
            print(f"error: job field {item.field!r}: {item.reason}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        _traceback_if(verbose)
        print(f"error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # 1 for a run that failed once under way (NoSpaceLeftError)
    raise AssertionError(f"unhandled command {args.command}")


def _traceback_if(verbose: bool) -> None:
    """-v: the traceback of the error being handled, above its one line."""
    if verbose:
        import traceback

        traceback.print_exc(file=sys.stderr)


def _quiet_libraries() -> None:
    """Silence library progress bars and deprecation chatter; fluxbatch prints its own progress."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


if __name__ == "__main__":
    raise SystemExit(main())
