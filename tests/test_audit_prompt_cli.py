"""`genserve audit-prompt --file`: JSON Lines are split at "\\n" only."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from genserve.cli import app


def test_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    # U+2028 and U+0085 are legal unescaped characters in a JSON string; splitlines() would cut there.
    rows = [{"prompt": "a red fox\u2028in the snow"}, {"prompt": "a lake\u0085at dawn", "negative": "blurry\u2029"}]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["audit-prompt", "--file", str(lines), "--json"])
    assert res.exit_code == 0, res.stdout
    verdicts = [json.loads(x) for x in res.stdout.split("\n") if x]
    assert [v["action"] for v in verdicts] == ["allow", "allow"]
