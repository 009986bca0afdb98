"""canitoolcall's corpus through our output parser, scored the way canitoolcall scores
engines: `python -m bench.toolcall_conformance` prints a Markdown table and every case that
does not pass, with its failing checks (the list kept in bench/RESULTS.md)."""

from __future__ import annotations

import collections

from canitoolcall.fixtures import load_fixtures
from canitoolcall.results import Status

from tests.canitoolcall_glue import case


def main() -> None:
    fixtures = load_fixtures(None)
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    failing: list[tuple[str, list[str]]] = []
    for fixture in fixtures:
        status, bad = case(fixture)
        per[fixture.family][status.value] += 1
        if status not in (Status.PASS, Status.SOFT_PASS):
            failing.append((fixture.id, bad))
    print("| family | cases | pass | soft pass | fail |")
    print("|---|---:|---:|---:|---:|")
    total: collections.Counter[str] = collections.Counter()
    for family, counts in sorted(per.items()):
        total.update(counts)
        print(f"| {family} | {sum(counts.values())} | {counts['pass']} | {counts['soft_pass']} "
              f"| {counts['fail'] + counts['error']} |")
    print(f"| **all** | {sum(total.values())} | {total['pass']} | {total['soft_pass']} "
          f"| {total['fail'] + total['error']} |")
    print()
    for fixture_id, bad in failing:
        print(f"- `{fixture_id}`: {bad[0][:200] if bad else ''}")


if __name__ == "__main__":
    main()
