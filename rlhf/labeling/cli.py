"""`python -m rlhf.labeling <command>`: serve the app, create a campaign, invite people, export votes.

    python -m rlhf.labeling create-campaign pairs-nov --pairs data/comparisons.parquet --gold data/gold.parquet
    python -m rlhf.labeling invite admin --admin
    python -m rlhf.labeling invite ana
    python -m rlhf.labeling serve --port 8000
    python -m rlhf.labeling export pairs-nov --out data/human/pairs-nov.parquet

Every command takes --db (a SQLite file by default, or a postgresql+psycopg:// URL).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.comparisons import read_comparisons, write_comparisons
from rlhf.labeling import accounts, campaigns, results
from rlhf.labeling.aggregate import QualityPolicy
from rlhf.labeling.db import Annotator, make_engine, reader, upgrade_database

DEFAULT_DB = "sqlite:///data/labeling/labeling.db"


def open_database(url: str, read_only: bool = False) -> Session:
    """A session on the migrated database; read_only: it never takes SQLite's write lock (see `db.reader`)."""
    engine = make_engine(url)
    upgrade_database(engine)
    return Session(reader(engine) if read_only else engine, expire_on_commit=False)


def add_quality_args(parser: argparse.ArgumentParser) -> None:
    defaults = QualityPolicy()
    parser.add_argument("--gold-accuracy-threshold", type=float, default=defaults.gold_accuracy_threshold,
                        help="flag annotators whose gold accuracy is below this share")
    parser.add_argument("--gold-min-answers", type=int, default=defaults.gold_min_answers,
                        help="gold answers needed before an annotator can be flagged")
    parser.add_argument("--flagged-vote-weight", type=float, default=defaults.flagged_vote_weight,
                        help="weight of a flagged annotator's votes: 0 excludes them, (0, 1) down-weights them")


def quality_policy(args) -> QualityPolicy:
    return QualityPolicy(args.gold_accuracy_threshold, args.gold_min_answers, args.flagged_vote_weight)


def serve(args) -> int:
    import uvicorn

    from rlhf.labeling.app import create_app

    app = create_app(args.db, session_hours=args.session_hours, gold_accuracy_threshold=args.gold_accuracy_threshold,
                     gold_min_answers=args.gold_min_answers, flagged_vote_weight=args.flagged_vote_weight,
                     secure_cookies=args.secure_cookies)
    # access_log off: one line per vote costs more CPU than the vote itself under load
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


def create_campaign(args) -> int:
    pairs = read_comparisons(args.pairs)
    gold = read_comparisons(args.gold) if args.gold else None
    with open_database(args.db) as db:
        campaign = campaigns.create_campaign(db, args.name, pairs, gold, overlap=args.overlap,
                                             gold_rate=args.gold_rate, seed=args.seed)
        print(f"campaign {campaign.name}: {len(pairs)} pairs, {0 if gold is None else len(gold)} gold, "
              f"overlap {campaign.overlap}, gold rate {campaign.gold_rate}")
    return 0


def invite(args) -> int:
    with open_database(args.db) as db:
        existed = db.scalar(select(Annotator.id).where(Annotator.name == args.name)) is not None
        token = accounts.invite(db, args.name, "admin" if args.admin else "annotator")
    if existed:
        print(f"{args.name} already had an account: its password no longer works and its sessions have ended, "
              "until the link below is used.", file=sys.stderr)
    print(f"{args.base_url.rstrip('/')}/invite/{token}")
    return 0


def export(args) -> int:
    with open_database(args.db, read_only=True) as db:  # a running server's votes do not wait for the export
        campaign = campaigns.find_campaign(db, args.name)
        if campaign is None:
            raise campaigns.CampaignError(
                f"there is no campaign named {args.name!r} in {args.db}. Campaigns are made with `create-campaign`; "
                "check the name and the --db URL."
            )
        exported, left_out = results.export_comparisons(db, campaign, quality_policy(args))
    out = Path(args.out)
    write_comparisons(exported, out)
    left_out_path = out.with_name(f"{out.stem}.left_out.csv")
    left_out.to_csv(left_out_path, index=False)
    reasons = left_out["reason"].value_counts().to_dict() if len(left_out) else {}
    print(f"exported {len(exported)} comparisons to {out}; left out {len(left_out)} {reasons} -> {left_out_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf.labeling", description="The human labeling web app.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        child = sub.add_parser(name, help=help)
        child.add_argument("--db", default=DEFAULT_DB, help=f"SQLAlchemy database URL (default {DEFAULT_DB})")
        child.set_defaults(func=func)
        return child

    s = command("serve", serve, "start the web app (uvicorn)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--session-hours", type=float, default=12.0, help="a login lasts this many hours")
    s.add_argument("--secure-cookies", action=argparse.BooleanOptionalAction, default=None,
                   help="force the Secure attribute on cookies on or off. Default: Secure unless a request reaches "
                        "the app as localhost/127.0.0.1/::1 over HTTP, and no login over plain HTTP elsewhere. "
                        "--secure-cookies behind an HTTPS proxy that does not send X-Forwarded-Proto; "
                        "--no-secure-cookies only on a closed network without HTTPS")
    add_quality_args(s)

    c = command("create-campaign", create_campaign, "make a campaign from a comparisons Parquet file")
    c.add_argument("name", help="campaign name; the export's source becomes human:<name>")
    c.add_argument("--pairs", required=True, help="comparisons Parquet file with the pairs to label")
    c.add_argument("--gold", help="comparisons Parquet file of expert-labelled gold pairs (`chosen` set)")
    c.add_argument("--overlap", type=int, default=campaigns.MIN_OVERLAP, help="distinct annotators per pair")
    c.add_argument("--gold-rate", type=float, default=0.1, help="share of each queue that is gold")
    c.add_argument("--seed", type=int, help="seed for gold placement and left/right order (default: random)")

    i = command("invite", invite, "create an annotator (or renew their invite) and print the invite link")
    i.add_argument("name")
    i.add_argument("--admin", action="store_true", help="give the account the admin role")
    i.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the app is reachable")

    e = command("export", export, "write a campaign's majority labels as comparisons (Parquet)")
    e.add_argument("name")
    e.add_argument("--out", required=True, help="Parquet file to write; left-out pairs go beside it as .left_out.csv")
    add_quality_args(e)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (campaigns.CampaignError, accounts.AccountError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
