"""`python -m rlhf.labeling`: create a campaign from Parquet, invite, export comparisons, errors as one paragraph."""
import re

from fastapi.testclient import TestClient

from rlhf.comparisons import read_comparisons, write_comparisons
from rlhf.labeling.app import create_app
from rlhf.labeling.cli import main
from tests.labeling.support import PASSWORD, csrf_token, label_everything, pair_rows


def invite_and_join(database_url: str, app, name: str, capsys) -> TestClient:
    assert main(["invite", name, "--db", database_url, "--base-url", "http://testserver"]) == 0
    link = capsys.readouterr().out.strip()
    assert re.fullmatch(r"http://testserver/invite/[A-Za-z0-9_-]{43}", link)
    client = TestClient(app)
    form = client.get(link)
    client.post(link, data={"password": PASSWORD, "confirm": PASSWORD, "csrf_token": csrf_token(form.text)})
    return client


def test_campaign_from_parquet_to_exported_comparisons(tmp_path, capsys):
    database_url = f"sqlite:///{tmp_path / 'labeling.db'}"
    write_comparisons(pair_rows({"p0": "a", "p1": "b", "p2": "both_bad", "p3": "tie"}), tmp_path / "pairs.parquet")
    write_comparisons(pair_rows({"g0": "b", "g1": "a"}, chosen_is_truth=True), tmp_path / "gold.parquet")
    assert main(["create-campaign", "nov", "--db", database_url, "--pairs", str(tmp_path / "pairs.parquet"),
                 "--gold", str(tmp_path / "gold.parquet"), "--gold-rate", "0.2", "--seed", "1"]) == 0
    assert "campaign nov: 4 pairs, 2 gold, overlap 3" in capsys.readouterr().out

    app = create_app(database_url, secure_cookies=False)  # TestClient: plain HTTP to 'testserver'
    for name in ("ann", "bob", "cy"):
        label_everything(invite_and_join(database_url, app, name, capsys), "nov")

    out = tmp_path / "export" / "human-nov.parquet"
    assert main(["export", "nov", "--db", database_url, "--out", str(out)]) == 0
    assert "exported 3 comparisons" in capsys.readouterr().out
    exported = read_comparisons(out).sort_values("pair_id")
    assert list(exported["pair_id"]) == ["p0", "p1", "p3"]
    assert list(exported["chosen"]) == ["a", "b", "tie"]
    assert set(exported["source"]) == {"human:nov"} and set(exported["policy_version"]) == {"policy-v1"}
    assert list(exported["votes"]) == [3, 3, 3]
    left_out = (tmp_path / "export" / "human-nov.left_out.csv").read_text()
    assert left_out.splitlines() == ["pair_id,reason,votes", "p2,both_bad,3"]


def test_errors_print_one_paragraph_and_exit_2(tmp_path, capsys):
    database_url = f"sqlite:///{tmp_path / 'labeling.db'}"
    write_comparisons(pair_rows({"p0": "a"}), tmp_path / "pairs.parquet")
    assert main(["create-campaign", "nov", "--db", database_url, "--pairs", str(tmp_path / "pairs.parquet"),
                 "--overlap", "2", "--gold-rate", "0"]) == 2
    assert "overlap is 2" in capsys.readouterr().err
    assert main(["export", "missing", "--db", database_url, "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no campaign named 'missing'" in capsys.readouterr().err
    assert main(["create-campaign", "nov", "--db", database_url, "--pairs", str(tmp_path / "absent.parquet")]) == 2
    assert "no comparisons at" in capsys.readouterr().err
