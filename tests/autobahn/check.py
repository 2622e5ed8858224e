#!/usr/bin/env python3
"""Checks an Autobahn (kosoku) index.json against the committed expectations.

usage: check.py MODE INDEX_JSON EXPECTED_JSON [--update]

Fails (exit 1) when a case is FAILED, UNIMPLEMENTED or ERROR, when a case
is missing, or when any verdict differs from the expected one. --update
rewrites EXPECTED_JSON from INDEX_JSON (after a deliberate change).
"""
import json
import sys

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}


def case_key(case):
    return tuple(int(p) for p in case.split("."))


def load_results(path):
    with open(path) as f:
        index = json.load(f)
    if len(index) != 1:
        sys.exit(f"{path}: expected results for one agent, found {sorted(index)}")
    (cases,) = index.values()
    return {
        case: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
        for case, r in cases.items()
    }


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    mode, index_path, expected_path = sys.argv[1:4]
    results = load_results(index_path)
    ordered = dict(sorted(results.items(), key=lambda kv: case_key(kv[0])))
    if "--update" in sys.argv[4:]:
        with open(expected_path, "w") as f:
            json.dump(ordered, f, indent=1)
            f.write("\n")
        print(f"autobahn {mode}: wrote {len(ordered)} expectations to {expected_path}")
        return

    with open(expected_path) as f:
        expected = json.load(f)
    problems = []
    for case, r in ordered.items():
        for field in ("behavior", "behaviorClose"):
            if r[field] not in ACCEPTABLE:
                problems.append(f"{case}: {field} {r[field]}")
        want = expected.get(case)
        if want is None:
            problems.append(f"{case}: not in the expected results")
        elif want != r:
            problems.append(f"{case}: expected {want}, got {r}")
    for case in expected:
        if case not in results:
            problems.append(f"{case}: expected but not run")

    counts = {}
    for r in results.values():
        counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    summary = ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
    status = "PASS" if not problems else "FAIL"
    print(f"autobahn {mode}: {status}: {len(results)} cases ({summary}); "
          f"{len(problems)} problem(s) against {expected_path}")
    for p in problems[:50]:
        print(f"  {p}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
