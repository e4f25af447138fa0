"""The conformance report: counts per mode, regressions (pass unpatched, fail patched), and the markdown table."""

from __future__ import annotations

import json

from tests.conformance import allowlist

MODES = ("eager", "patched")


def counts(tests: dict) -> dict:
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for record in tests.values():
        out[record["outcome"]] += 1
    return out


def compare(eager: dict, patched: dict) -> dict:
    """Regressions (pass unpatched, fail patched), not-applicable ones, and tests fixed by the patch."""
    regressions, not_applicable, fixed, patched_none = [], [], [], []
    for name in sorted(set(eager) | set(patched)):
        before, after = eager.get(name, {}), patched.get(name, {})
        if before.get("outcome") == "passed" and after.get("outcome") == "failed":
            entry = {"test": name, **{k: after[k] for k in ("error", "where", "ours") if k in after}}
            why = allowlist.reason(name)
            (not_applicable if why else regressions).append({**entry, "reason": why} if why else entry)
        elif before.get("outcome") == "failed" and after.get("outcome") == "passed":
            fixed.append({"test": name, "unpatched_error": before.get("error")})
        if after.get("outcome") == "passed" and after.get("patched_models") == 0:
            patched_none.append(name)
    return {"regressions": regressions, "not_applicable": not_applicable, "fixed_by_patch": fixed,
            "passed_patched_without_building_a_model": patched_none}


def markdown(report: dict) -> str:
    lines = [
        "# Conformance: transformers' model tests on moeplug-patched models",
        "",
        f"`{report['command']}` — transformers {report['transformers']}, torch {report['torch']}, "
        f"{report['date']}, {report['wall_seconds']:.0f} s on {report['machine']}.",
        "",
        f"Library: {report.get('library', 'unknown')}." + (f" {report['note']}" if report.get("note") else ""),
        "",
        "Each family's tiny config (MoE in every layer) runs transformers' `ModelTesterMixin` and `ConfigTester` "
        "(from its sdist) plus moeplug's own generation, compile, export and pickling checks (`test_moeplug_*`; the sdist "
        "lacks transformers' generation and export mixins), unpatched with eager experts and with every model "
        "patched by `moeplug.patch_model`. A regression passes unpatched and fails patched.",
        "",
        "| family | unpatched passed / failed / skipped | patched passed / failed / skipped | regressions | not applicable |",
        "|---|---|---|---|---|",
    ]
    for family, fam in report["families"].items():
        if "error" in fam:
            lines.append(f"| {family} | error | error | – | – |")
            continue
        cells = []
        for mode in MODES:
            c = fam.get(mode, {}).get("counts")
            cells.append(f"{c['passed']} / {c['failed']} / {c['skipped']}" if c else "–")
        n_reg, n_na = (len(fam[k]) if k in fam else "–" for k in ("regressions", "not_applicable"))
        lines.append(f"| {family} | {cells[0]} | {cells[1]} | {n_reg} | {n_na} |")
    for title, key in (("Regressions", "regressions"), ("Not applicable to a patched model", "not_applicable")):
        rows = [(family, r) for family, fam in report["families"].items() for r in fam.get(key, [])]
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("None.")
            continue
        lines += ["| family | test | error | where | first frame in moeplug/kernels |", "|---|---|---|---|---|"]
        for family, r in rows:
            error = r.get("error", "").replace("|", "\\|")
            extra = f" ({r['reason']})" if r.get("reason") else ""
            lines.append(f"| {family} | `{r['test']}` | {error}{extra} | `{r.get('where', '')}` | `{r.get('ours', '–')}` |")
    both: dict[tuple[str, str], list[str]] = {}
    for family, fam in report["families"].items():
        eager, patched = (fam.get(m, {}).get("tests", {}) for m in MODES)
        for name, record in eager.items():
            if record["outcome"] == "failed" and patched.get(name, {}).get("outcome") == "failed":
                both.setdefault((name, record.get("error", "")), []).append(family)
    if both:
        lines += ["", "## Failing unpatched too (not regressions)", "", "| test | families | unpatched error |",
                  "|---|---|---|"]
        for (name, error), fams in sorted(both.items()):
            lines.append(f"| `{name}` | {', '.join(fams)} | {error.replace('|', chr(92) + '|')} |")
    errors = [(family, fam["error"]) for family, fam in report["families"].items() if "error" in fam]
    for family, error in errors:
        lines += ["", f"**{family}: the run failed:** ```{error}```"]
    return "\n".join(lines) + "\n"


def slim(tests: dict, mode: str) -> dict:
    """Per-test records as stored in the report: durations only above 2 s, no patch count in eager mode."""
    out = {}
    for name, record in tests.items():
        record = dict(record)
        if record.get("seconds", 0) <= 2:
            record.pop("seconds", None)
        if mode == "eager":
            record.pop("patched_models", None)
        if "reason" in record:
            record["reason"] = record["reason"][:120]
        out[name] = record
    return out


def dumps(report: dict) -> str:
    """JSON with one line per leaf object or list (a test record), so the file stays small and diffs readable."""
    return _dump(report, 0) + "\n"


def _dump(value, depth: int) -> str:
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        pad = " " * (depth + 1)
        return "[\n" + ",\n".join(pad + _dump(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value)
