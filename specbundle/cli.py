"""`specbundle`: list, pull, push, verify and describe EAGLE-3 draft bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specbundle.bundle import BundleError
from specbundle.config import DraftConfigError

EPILOG = """examples:
  specbundle list
  specbundle pull meta-llama/Llama-3.1-8B-Instruct --local-dir drafts/llama31
  specbundle pull org/my-draft --revision 3f2a...c9 --cache-dir ~/.cache/huggingface/hub
  specbundle push drafts/my-draft org/my-draft --private
  specbundle verify drafts/my-draft --target ~/models/SmolLM2-135M-Instruct
  specbundle card drafts/my-draft --write

Hub traffic goes through huggingface_hub: HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE=1 apply."""


def _cmd_list(args) -> int:
    from specbundle.catalog import format_catalog

    print(format_catalog())
    return 0


def _cmd_pull(args) -> int:
    from specbundle.hub import pull_bundle

    path = pull_bundle(
        args.bundle, revision=args.revision, cache_dir=args.cache_dir, local_dir=args.local_dir, token=args.token
    )
    print(path)
    return 0


def _cmd_push(args) -> int:
    from specbundle.hub import push_bundle

    info = push_bundle(
        args.folder,
        args.repo,
        revision=args.revision,
        private=args.private,
        token=args.token,
        rehash=args.rehash,
        commit_message=args.message,
    )
    print(f"pushed {args.folder} to {args.repo} at commit {info.oid}")
    return 0


def _cmd_verify(args) -> int:
    from specbundle.bundle import verify_bundle
    from specbundle.hub import pull_bundle
    from specbundle.target import load_target_info

    target = load_target_info(args.target, revision=args.target_revision) if args.target else None
    folder = Path(args.bundle)
    if not folder.exists():
        folder = pull_bundle(args.bundle, revision=args.revision, cache_dir=args.cache_dir, token=args.token)
    report = verify_bundle(folder, target)
    for check in report.checks:
        print(f"ok  {check}")
    if report.metadata is not None and not report.metadata.trained:
        print('note: bundle.json marks this draft "trained": false (placeholder weights)')
    print(f"verified {folder}")
    return 0


def _cmd_card(args) -> int:
    from specbundle.bundle import BundleMetadata, seal_bundle
    from specbundle.card import render_card

    meta = BundleMetadata.from_file(args.bundle)
    if args.trained is not None:
        meta.trained = args.trained
    if args.write:
        seal_bundle(args.bundle, meta)
        print(f"wrote {Path(args.bundle) / 'README.md'} and refreshed the hashes in bundle.json", file=sys.stderr)
    print(render_card(meta, args.repo_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specbundle",
        description="EAGLE-3 draft bundles: a draft checkpoint (config.json + model.safetensors, SGLang/SpecForge "
        "layout), a model card and bundle.json (target, recipe, results, sha256 of every file).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("list", help="print the catalog of known bundles and their targets")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "pull",
        help="download and verify a bundle (only its listed files)",
        description="Download a bundle by its Hub repo id or by a target id from the catalog. bundle.json is read "
        "first, then only the files it lists are fetched from that same commit and checked against their sha256. "
        "A bundle that fails is removed and nothing is left at --local-dir. Prints the bundle folder.",
    )
    p.add_argument("bundle", help="bundle repo id (org/name) or a target id known to the catalog")
    p.add_argument("--revision", help="branch, tag or commit sha to pin (default: main)")
    p.add_argument("--cache-dir", help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    p.add_argument("--local-dir", help="also install the verified bundle as plain files in this folder")
    p.add_argument("--token", help="Hub token for a private repo (default: HF_TOKEN or the saved login)")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser(
        "push",
        help="create the Hub repo and upload a bundle with a generated card",
        description="Upload a bundle folder (it must hold bundle.json). The model card is generated from bundle.json "
        "and the hashes re-recorded in a staging copy; the folder itself is not modified.",
    )
    p.add_argument("folder", help="local bundle folder")
    p.add_argument("repo", help="Hub repo id (org/name); created if missing")
    p.add_argument("--revision", help="branch to push to (created from main if missing; default: main)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--rehash", action="store_true", help="re-record the sha256 of changed or new files")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "verify",
        help="check hashes, shapes and fit to a target model",
        description="Verify a bundle folder (or pull a Hub bundle and verify it): sha256 of every file, checkpoint "
        "keys and shapes, bundle.json vs config.json, and with --target the hidden size, vocabulary, aux layer ids "
        "and target id. Exit status 1 with the problem named when anything fails.",
    )
    p.add_argument("bundle", help="bundle folder, or a Hub repo id / catalog target id to pull first")
    p.add_argument("--target", help="target model: a local HF folder, a .gguf file or a Hub id (config read only)")
    p.add_argument("--target-revision", help="revision of a Hub target's config")
    p.add_argument("--revision", help="revision of a Hub bundle")
    p.add_argument("--cache-dir", help="Hugging Face cache folder for a Hub bundle")
    p.add_argument("--token", help="Hub token for a private bundle repo")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "card",
        help="print (or --write) the model card generated from bundle.json",
        description="Render README.md from bundle.json. With --write, store it and re-record every file's sha256 "
        "in bundle.json (use after replacing the weights, e.g. with a trained draft).",
    )
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--write", action="store_true", help="write README.md and refresh the hashes in bundle.json")
    p.add_argument("--repo-id", help="repo id to show in the usage example")
    trained = p.add_mutually_exclusive_group()
    trained.add_argument("--trained", dest="trained", action="store_true", default=None, help="mark as trained")
    trained.add_argument("--untrained", dest="trained", action="store_false", help="mark as a placeholder")
    p.set_defaults(func=_cmd_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BundleError, DraftConfigError) as e:
        print(f"specbundle {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
