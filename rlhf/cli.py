"""The `rlhf` command: run the cycle, check params, and the services' subcommands."""
from __future__ import annotations

import argparse
import sys

from rlhf.params import ParamError


def _cycle(args) -> int:
    from flows.cycle import rlhf_cycle

    result = rlhf_cycle(stages=args.stages or None, force=args.force)
    print(f"cycle done: ran {result['ran'] or 'nothing'}; unchanged {result['unchanged'] or 'nothing'}")
    return 0


def _check_params(args) -> int:
    from rlhf.params import load_params

    params = load_params(args.file)
    for name in params.__dataclass_fields__:
        print(f"{name}: {params.section(name)}")
    return 0


def _promote(args) -> int:
    from rlhf.params import load_params
    from rlhf.promote import set_champion

    name = args.model or load_params().promote.model_name
    decision = set_champion(name, args.version, reason=args.reason, by=args.by)
    print(f"{name} v{args.version} is now the champion ({decision.rule}: {decision.reason})")
    return 0


def _rollback(args) -> int:
    from rlhf.params import load_params
    from rlhf.promote import rollback

    name = args.model or load_params().promote.model_name
    version = rollback(name, reason=args.reason, by=args.by)
    print(f"{name}: rolled back; v{version} is the champion again")
    return 0


def _gate(args) -> int:
    from rlhf.human_gate import decide_when_complete
    from rlhf.params import load_params

    params = load_params()
    name = args.model or params.promote.model_name
    result = decide_when_complete(name, args.version, args.db or params.evaluate.human_database, params.promote,
                                  params.evaluate.win_rate_confidence, args.wait, args.poll)
    print(result.summary())
    return 0


def _label(args) -> int:
    from rlhf.labeling.cli import main as label_main

    return label_main(args.rest)


def _serve(args) -> int:
    from rlhf.serve import main as serve_main

    return serve_main(args.host, args.port, args.params, args.api_keys_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="An RLHF pipeline: DVC stages under Prefect flows, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    cycle = sub.add_parser("cycle", help="run one cycle of the pipeline (DVC reruns only what changed)")
    cycle.add_argument("--stages", nargs="*", help="only these stages, in pipeline order")
    cycle.add_argument("--force", action="store_true", help="rerun the stages even when DVC finds them unchanged")
    cycle.set_defaults(func=_cycle)
    check = sub.add_parser("check-params", help="load and validate params.yaml, print every setting")
    check.add_argument("--file", default="params.yaml")
    check.set_defaults(func=_check_params)
    manual = sub.add_parser("promote", help="make a registered policy version the champion by hand (recorded with who and why)")
    manual.add_argument("--version", required=True)
    manual.add_argument("--reason", required=True, help="why; stored on the model version")
    manual.add_argument("--by", help="who (default: the login name)")
    manual.add_argument("--model", help="registered model name (default: promote.model_name)")
    manual.set_defaults(func=_promote)
    back = sub.add_parser("rollback", help="make the previous champion the champion again")
    back.add_argument("--reason", required=True)
    back.add_argument("--by")
    back.add_argument("--model")
    back.set_defaults(func=_rollback)
    gate = sub.add_parser("gate", help="decide a version that awaits people: read its human evaluation campaign and, "
                                       "once complete, record the gate's decision (promoting it if it passes)")
    gate.add_argument("--version", required=True, help="the registered version the promote stage left awaiting")
    gate.add_argument("--model", help="registered model name (default: promote.model_name)")
    gate.add_argument("--db", help="the labeling database holding the campaign (default: evaluate.human_database)")
    gate.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="while the campaign is not complete, look again for up to this long (default: look once)")
    gate.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="seconds between looks with --wait")
    gate.set_defaults(func=_gate)
    label = sub.add_parser("label", help="the labeling web app: serve, create-campaign, invite, export (see `rlhf label --help`)",
                           add_help=False)
    label.add_argument("rest", nargs=argparse.REMAINDER)
    label.set_defaults(func=_label)
    serve = sub.add_parser("serve", help="serve the registry's champion (OpenAI-compatible API; keys from RLHF_API_KEYS)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--params", default="params.yaml", help="settings file (its `serve` and `promote` sections)")
    serve.add_argument("--api-keys-file", help="one API key per line, instead of the RLHF_API_KEYS variable")
    serve.set_defaults(func=_serve)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["label"]:  # the labeling app parses its own arguments, --help included
        from rlhf.labeling.cli import main as label_main

        return label_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ParamError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
