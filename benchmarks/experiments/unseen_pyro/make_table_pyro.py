"""Prints the markdown table of results/*.json (as ``unseen_numpyro/make_table.py`` does).

Usage: python make_table_pyro.py
"""

import json
import os

import models_pyro
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LABEL = {"elbo": "ELBO", "ours": "ours"}
MODELS = list(models_pyro.MODELS)  # the models' own order


def flag(r):
    return r.get("error") is not None or r["sd_ratio_min"] < 0.05 or r["mean_err"] > 3


def why(r, coords):
    if r.get("error") is not None:
        return f"s{r['seed']}:crash"
    out = f"s{r['seed']}:" + ("err>3" if r["mean_err"] > 3 else "")
    if r["sd_ratio_min"] < 0.05:
        out += f"sd{r['sd_ratio_min']:.3f}@{coords[r['argmin_sd']]}"
    return out


def summarise(runs):
    ok = [r for r in runs if r.get("error") is None]
    return dict(
        mean_err=np.mean([r["mean_err"] for r in ok]) if ok else float("nan"),
        seeds=", ".join(f"{r['mean_err']:.3f}" if r in ok else "crash" for r in runs),
        sd=np.mean([r["sd_ratio_median"] for r in ok]) if ok else float("nan"),
        sd_min=min(r["sd_ratio_min"] for r in ok) if ok else float("nan"),
        nflag=sum(flag(r) for r in runs),
        nelbo=np.median([r["neg_elbo"] for r in ok]) if ok else float("nan"),
        rejected=sum(r.get("num_rejected", 0) for r in runs),
        warnings=sum(len(r["warnings"]) + len(r["log"]) for r in runs),
    )


def main():
    print(
        "| model | d | NUTS div | ELBO mean err (seeds) | ours mean err (seeds) "
        "| sd ratio median ELBO / ours | sd ratio min ELBO / ours | flags (seeds flagged /3) "
        "| -ELBO ELBO / ours | ours rejected steps | warnings ELBO / ours | winner |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        path = os.path.join(HERE, "results", f"{m}.json")
        if not os.path.exists(path):
            print(f"| {m} | (no results) |")
            continue
        with open(path) as f:
            R = json.load(f)
        s = {meth: summarise(R[meth]) for meth in ("elbo", "ours")}
        e, o = s["elbo"]["mean_err"], s["ours"]["mean_err"]
        win = "tie" if abs(e - o) < 0.1 * max(e, o) else ("ours" if o < e else "ELBO")
        fl = [
            f"{LABEL[meth]} {s[meth]['nflag']}/3 "
            f"({' '.join(why(r, R['coords']) for r in R[meth] if flag(r))})"
            for meth in ("elbo", "ours")
            if s[meth]["nflag"]
        ]
        print(
            f"| {m} | {R['d']} | {R['nuts_divergences']} "
            f"| {e:.3f} ({s['elbo']['seeds']}) | {o:.3f} ({s['ours']['seeds']}) "
            f"| {s['elbo']['sd']:.3f} / {s['ours']['sd']:.3f} "
            f"| {s['elbo']['sd_min']:.3f} / {s['ours']['sd_min']:.3f} "
            f"| {'; '.join(fl) or '-'} | {s['elbo']['nelbo']:.2f} / {s['ours']['nelbo']:.2f} "
            f"| {s['ours']['rejected']} | {s['elbo']['warnings']} / {s['ours']['warnings']} "
            f"| {win} |"
        )


if __name__ == "__main__":
    main()
