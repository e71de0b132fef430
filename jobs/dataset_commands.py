"""The `fluxbatch synthesize` and `fluxbatch catalog run` subcommands: argument parsing and printing only.

The work is in jobs/synthesize.py and jobs/catalog.py; this module imports them only when a command runs,
so `fluxbatch --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    """Add `synthesize` and `catalog` to the `fluxbatch` subcommands."""
    synth = sub.add_parser(
        "synthesize", help="draw a synthetic data set's prompts from templates and render them",
        description="Draw prompts from the templates and slot vocabularies of SPEC (same spec, same manifest), "
        "write them to OUTPUT/manifest.parquet and render them; output.layout picks files, webdataset or "
        "hf-parquet.")
    synth.add_argument("spec", metavar="SPEC.yaml", help="synthesis spec (docs/datasets-and-catalog.md)")
    synth.add_argument("--draw-only", action="store_true", help="write the manifest, render nothing")
    _add_common(synth)

    catalog = sub.add_parser("catalog", help="catalog assets: product images at stable paths",
                             description="Catalog assets.")
    catalog_sub = catalog.add_commands("catalog_command", "SUBCOMMAND")
    run = catalog_sub.add_parser(
        "run", help="render what changed in the product table and publish it at stable paths",
        description="Render the products of SPEC whose render parameters changed since the last run, publish "
        "them at OUTPUT/catalog/<sku>/<aspect>/<variant>.<ext>, keep replaced images under "
        "OUTPUT/catalog/_previous/, and report new, changed, removed and failed SKUs.")
    run.add_argument("spec", metavar="SPEC.yaml", help="catalog spec (docs/datasets-and-catalog.md)")
    _add_common(run)


def _add_common(parser: argparse.ArgumentParser) -> None:
    from jobs.storage_options import add_storage_option_flag

    parser.add_argument("--output", help="output folder or s3:// prefix (overrides output.uri)")
    parser.add_argument("--new-version", action="store_true",
                        help="accept model or defaults that differ from OUTPUT/_job.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_storage_option_flag(parser)


def run_command(args: argparse.Namespace) -> int:
    """Run `synthesize` or `catalog run`; a problem the user can fix (a FluxbatchError) reaches `jobs.cli.main`,
    which prints it as one line, exit 2."""
    return _synthesize(args) if args.command == "synthesize" else _catalog_run(args)


def load_spec(spec_type: Any, args: argparse.Namespace) -> Any:
    """The synthesis or catalog spec named on the command line, OUTPUT and --storage-option applied (also read by
    `fluxbatch k8s`, which checks the spec before it writes the cluster's manifests)."""
    from jobs.storage_options import apply_storage_options, check_storage_options

    spec = spec_type.from_yaml(args.spec, **{"output.uri": args.output})
    check_storage_options(args.storage_option, [spec.output.uri, getattr(spec, "products", None)])
    return apply_storage_options(spec, args.storage_option)


def check_model_defaults(spec: Any, args: argparse.Namespace) -> None:
    """The spec's defaults obey a row's rules with its model's limits, named by the spec file and the field, before
    anything is drawn or written (a local run; `fluxbatch k8s` checks them with its own model rules)."""
    from flux_worker.presets import resolve_preset
    from schemas.job import check_defaults

    job = spec.job_for("manifest.parquet")
    check_defaults(job, job.row_limits(resolve_preset(job.model.name, job.storage_options).limits), source=args.spec)


def _synthesize(args: argparse.Namespace) -> int:
    from jobs.synthesize import synthesize
    from schemas.synthesis import SynthesisSpec

    spec = load_spec(SynthesisSpec, args)
    check_model_defaults(spec, args)
    manifest, summary = synthesize(spec, render=not args.draw_only, new_version=args.new_version,
                                   progress=not args.no_progress)
    print(f"drew {spec.prompts} prompts x {spec.images_per_prompt} images into {manifest}")
    if summary is None:
        return 0
    print(f"{summary.images_rendered} rendered, {summary.images_already_done} already done, "
          f"{summary.images_failed} failed; {summary.images_total_done}/{summary.images_expected} images "
          f"in {spec.output.uri} (layout {spec.output.layout})")
    return 0 if summary.complete else 1


def _catalog_run(args: argparse.Namespace) -> int:
    from jobs.catalog import run_catalog
    from schemas.catalog import CatalogSpec

    spec = load_spec(CatalogSpec, args)
    check_model_defaults(spec, args)
    report, summary = run_catalog(spec, new_version=args.new_version, progress=not args.no_progress)
    print(f"{report.products} products: {len(report.skus_new)} new, {len(report.skus_changed)} changed, "
          f"{report.skus_unchanged} unchanged, {len(report.skus_removed)} removed, {len(report.skus_failed)} "
          f"failed, {len(report.skus_refused)} refused; {report.images_rendered} images rendered, "
          f"{report.assets_published} published, {report.previous_versions_kept} previous versions kept")
    for label, skus in (("changed", report.skus_changed), ("removed", report.skus_removed),
                        ("failed", report.skus_failed)):
        if skus:
            print(f"  {label}: {', '.join(skus[:20])}{' ...' if len(skus) > 20 else ''}")
    for problem in report.problems[:20]:
        print(f"  refused: {problem}")
    print(f"report: {spec.output.uri.rstrip('/')}/catalog/_runs/{report.run_id}.json")
    return 0 if summary.complete and not report.skus_failed else 1
