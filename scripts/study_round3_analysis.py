"""Round 3's tables, from results.json only (PLAN.md, "Analysis")."""
import json
import os


def write(records, out):
    """OUT/results.md: one line per finished run (the full analysis comes with the results)."""
    lines = ["# Round 3 results (in progress)", "", "| run | tier | kind | val cp % | test top-1 % |", "|---|---:|---|---:|---:|"]
    for name, r in sorted(records.items(), key=lambda kv: (kv[1].get("tier", 9), kv[0])):
        val, test = r.get("val") or {}, r.get("test") or {}
        lines.append(f"| {name} | {r.get('tier')} | {r.get('kind')} | {val.get('computation_percentage', float('nan')):.3f} "
                     f"| {test.get('accuracy', float('nan')):.2f} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({"runs": len(records)}))
