import json
import os

import models
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
order = list(models.MODELS)  # the models' own order
rows, summary = [], {}


def flag(r):
    return r.get("error") is not None or r["sd_ratio_min"] < 0.05 or r["mean_err"] > 3


print(
    "| model | d | NUTS div (2nd chain) | 2nd-chain max z | ELBO mean err | ours mean err | ELBO sd ratio | ours sd ratio | flags (seeds flagged /3) | -ELBO(2000 draws) ELBO / ours | wins |"  # noqa: E501
)
print("|---|---|---|---|---|---|---|---|---|---|---|")
for m in order:
    R = json.load(open(os.path.join(HERE, "results", f"{m}.json")))
    s = {}
    for meth in ("elbo", "ours"):
        L = R[meth]
        s[meth] = dict(
            mean_err=np.mean([r["mean_err"] for r in L]),
            mean_err_seeds=[round(r["mean_err"], 3) for r in L],
            sd=np.mean([r["sd_ratio_median"] for r in L]),
            sd_min=min(r["sd_ratio_min"] for r in L),
            nflag=sum(flag(r) for r in L),
            nelbo=np.median([r["neg_elbo_2000"] for r in L]),
            min_coord=sorted({R["coords"][r["argmin_sd"]] for r in L}),
            warnings=sum(len(r["warnings"]) + len(r["log"]) for r in L),
        )
    e, o = s["elbo"]["mean_err"], s["ours"]["mean_err"]
    win = "tie" if abs(e - o) < 0.1 * max(e, o) else ("ours" if o < e else "ELBO")
    fl = []
    for meth in ("elbo", "ours"):
        if s[meth]["nflag"]:
            why = [
                f"s{r['seed']}:"
                + ("err>3" if r["mean_err"] > 3 else "")
                + (
                    f"sd{r['sd_ratio_min']:.3f}@{R['coords'][r['argmin_sd']]}"
                    if r["sd_ratio_min"] < 0.05
                    else ""
                )
                for r in R[meth]
                if flag(r)
            ]
            fl.append(
                f"{'ELBO' if meth == 'elbo' else 'ours'} {s[meth]['nflag']}/3 ({' '.join(why)})"
            )
    print(
        f"| {m} | {R['d']} | {R['nuts_divergences']} ({R['nuts2_divergences']}) | {R['nuts2_max_z']:.2f} | {e:.3f} ({', '.join(map(str, s['elbo']['mean_err_seeds']))}) | "  # noqa: E501
        f"{o:.3f} ({', '.join(map(str, s['ours']['mean_err_seeds']))}) | {s['elbo']['sd']:.3f} | {s['ours']['sd']:.3f} | {'; '.join(fl) or '-'} | "  # noqa: E501
        f"{s['elbo']['nelbo']:.2f} / {s['ours']['nelbo']:.2f} | {win} |"
    )
    summary[m] = dict(
        d=R["d"],
        nuts_div=R["nuts_divergences"],
        nuts2_max_z=R["nuts2_max_z"],
        win=win,
        **{
            f"{k}_{kk}": (float(v) if isinstance(v, (float, np.floating)) else v)
            for k in s
            for kk, v in s[k].items()
        },
    )
json.dump(summary, open(os.path.join(HERE, "summary.json"), "w"), indent=1)
