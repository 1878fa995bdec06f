"""Tables and plots of docs/results.md, from the studies' own logs.

    python benchmarks/make_results.py extract   # runs' TensorBoard logs / JSON -> benchmarks/results/*.json (committed)
    python benchmarks/make_results.py report    # those JSON files -> docs/img/*.png and the tables in docs/results.md
    python benchmarks/make_results.py           # both (--runs, --results, --doc, --img move the folders)

``extract`` reads ``benchmarks/runs/`` (written by llm_study.py, llm_tuning.py, fidelity_study.py; not committed) and
keeps, per run, the evaluation curves and timings; study 2's driver (edis_study.py) writes its own per-run files.
``report`` needs only the committed JSON files, so the figures and tables can be regenerated on any machine. Tables
go between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` markers in docs/results.md, so the numbers in the
text cannot drift from the data. Spreads are sample standard deviations (n - 1) over seeds.
"""

import dataclasses
import glob
import json
import math
import os
import re
import statistics
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "benchmarks", "runs")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
IMG = os.path.join(ROOT, "docs", "img")
DOC = os.path.join(ROOT, "docs", "results.md")
LLM_LABELS = {"grpo": "GRPO", "reval_k1": "ReVal K=1", "reval_k2": "ReVal K=2", "reval_k4": "ReVal K=4",
              "reval_k8": "ReVal K=8"}


# ---------------------------------------------------------------------------------------------------------------
# extract: run logs -> compact JSON
# ---------------------------------------------------------------------------------------------------------------
def scalars(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice: keep the last
        out[tag] = sorted(by_step.items())
    return out


def finished_runs(study: str, pattern: tuple) -> list:
    """(run folder, its path parts below the study folder, summary) of every run of a study that wrote summary.json."""
    root = os.path.join(RUNS, study)
    return [(os.path.dirname(f), os.path.relpath(os.path.dirname(f), root).split(os.sep), json.load(open(f)))
            for f in sorted(glob.glob(os.path.join(root, *pattern, "summary.json")))]


def llm_run_record(run_dir: str, summary: dict) -> dict:
    """One LLM run: its evaluation curve (with cumulative training time) and median timings."""
    s = scalars(run_dir)
    round_s = dict(s["time/round_s"])
    evals, cum, t = [], 0.0, 0
    for step, acc in s["eval/accuracy"]:
        while t < step:  # training time (generation + reward + update) up to this evaluation, evaluation excluded
            t += 1
            cum += round_s.get(t, 0.0)
        evals.append({"round": step, "train_time_s": round(cum, 2), "accuracy": acc,
                      "accuracy_sampled": dict(s.get("eval/accuracy_sampled", [])).get(step)})
    med = lambda tag: statistics.median(v for _, v in s[tag])  # noqa: E731
    return {"evals": evals, "median_round_s": med("time/round_s"), "median_generation_s": med("time/generation_s"),
            "median_update_s": med("time/update_s"), "generation_tokens_per_s": med("time/generation_tokens_per_s"),
            "train_tokens_per_s": med("time/train_tokens_per_s"), "wall_time_s": summary["wall_time_s"]}


def extract_llm() -> None:
    runs = [{"setting": setting, "method": method, "seed": int(seed[4:]), **llm_run_record(run_dir, summary)}
            for run_dir, (setting, method, seed), summary in finished_runs("llm", ("*", "*", "seed*"))]
    write_json("llm_study.json", {"manifest": read_manifest("llm"), "runs": runs})


def extract_llm_tuning() -> None:
    found = finished_runs("llm_tuning", ("*", "*", "*", "seed*"))
    runs = [{"phase": phase, "method": method, "config": config, "seed": int(seed[4:]),
             **llm_run_record(run_dir, summary)} for run_dir, (phase, method, config, seed), summary in found]
    selections = {os.path.basename(os.path.dirname(f)): json.load(open(f))
                  for f in sorted(glob.glob(os.path.join(RUNS, "llm_tuning", "*", "selection.json")))}
    write_json("llm_tuning.json", {"manifest": read_manifest("llm_tuning"), "selections": selections, "runs": runs})


ENDPOINT_EVALS = 3  # study 2's endpoint, fixed before the runs: the mean score of the last 3 evaluations
EDIS_RESULTS = "edis_study"  # study 2: one JSON file per finished run, written by benchmarks/edis_study.py


def edis_run_record(run_dir: str, summary: dict) -> dict:
    """One run of study 2: its evaluation curve, scores and timings, from its own log."""
    s = scalars(run_dir)
    cfg = json.load(open(os.path.join(run_dir, "config.json")))["args"]
    return {"offline_steps": cfg["offline_steps"],
            "evals": [{"step": st, "score": v} for st, v in s["eval/normalized_score"]],
            "success": [{"step": st, "rate": v} for st, v in s["eval/success_rate"]],
            "offline_score": summary["offline_normalized_score"],
            "final_score": summary["final_normalized_score"], "regret": summary["regret"],
            "retrain_time_s": [v for _, v in s.get("edis/retrain_time_s", [])],
            "offline_updates_per_s": statistics.median(v for st, v in s["charts/SPS"] if st <= cfg["offline_steps"]),
            "online_wall_s": summary["wall_time_s"],
            # Cal-QL's critic at the end of the online phase (last logged value; absent for IQL)
            "end": {k: s[k][-1][1] for k in ("losses/alpha_prime", "losses/cql_loss", "losses/td_loss") if k in s},
            "eval_episodes": cfg["eval_episodes"]}


def load_edis_study() -> dict:
    """The committed per-run files of study 2 (the offline phases' records aside)."""
    files = sorted(glob.glob(os.path.join(RESULTS, EDIS_RESULTS, "*.json")))
    runs = [json.load(open(f)) for f in files]
    return {"runs": [r for r in runs if r["arm"] != "offline"]}


def extract_fidelity() -> None:
    """runs/fidelity/*_seed*.json, or one such set per sub-folder (one per denoiser/energy setting of the same seeds):
    then each seed's sets are concatenated, their names prefixed with the sub-folder's name (``_`` -> space)."""
    root = os.path.join(RUNS, "fidelity")
    files = sorted(glob.glob(os.path.join(root, "*_seed*.json")))
    if files:
        write_json("fidelity_study.json", {"seeds": [json.load(open(f)) for f in files]})
        return
    merged = {}
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]  # noqa: E731
    for sub in sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))), key=natural):
        label = sub.replace("_", " ")
        for f in sorted(glob.glob(os.path.join(root, sub, "*_seed*.json"))):
            d = json.load(open(f))
            seed = merged.setdefault(os.path.basename(f), dict(d, rows=[], samples_per_s={}, energy_acc={},
                                                               timing_s={}, settings={}))
            seed["settings"][label] = {k: d.get(k) for k in ("energy_steps", "overrides", "commit")}
            real = [r for r in d["rows"] if "(real" in r["set"]]
            seed["rows"] += [r for r in real if r["set"] not in {x["set"] for x in seed["rows"]}]
            seed["rows"] += [dict(r, set=f"{label}: {r['set']}") for r in d["rows"] if r not in real]
            for key in ("samples_per_s", "energy_acc", "timing_s"):
                seed[key].update({f"{label}: {k}": v for k, v in d[key].items()})
    write_json("fidelity_study.json", {"seeds": list(merged.values())})


def read_manifest(study: str) -> dict:
    path = os.path.join(RUNS, study, "manifest.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def write_json(name: str, obj: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name), "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {os.path.join(RESULTS, name)}")


# ---------------------------------------------------------------------------------------------------------------
# report: JSON -> tables + figures
# ---------------------------------------------------------------------------------------------------------------
def ms(values: list, fmt: str = "{:.3f}") -> str:
    """'mean ± std' over seeds (sample std, n - 1); the bare value for one seed; '–' for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])  # one seed: no spread to give
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def paired(diffs: list) -> str:
    """'k/n better, 95 % CI [lo, hi], p = ...' for paired differences: scipy's one-sample t-test of their mean against
    0, two-sided (the same as a paired t-test of the two arms), and the t interval of the mean."""
    from scipy import stats

    n, better = len(diffs), sum(d > 0 for d in diffs)
    if n < 2 or statistics.stdev(diffs) == 0:
        return f"{better}/{n} better"
    res = stats.ttest_1samp(diffs, 0.0)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    mean = statistics.mean(diffs)
    p = f"{res.pvalue:.2f}" if res.pvalue >= 0.005 else f"{res.pvalue:.1e}"  # what would print as 0.00: its digits
    return f"{better}/{n} better, 95 % CI [{mean - half:.1f}, {mean + half:.1f}], p = {p}"


def rounds_to_reach(run: dict, target: float, key: str):
    """(first evaluated round, its training time) with accuracy >= target; None if never."""
    for e in run["evals"][1:]:
        if e[key] is not None and e[key] >= target:
            return e["round"], e["train_time_s"]
    return None


def comparison_table(rs: list, labels: dict) -> str:
    """Rows per method (labels: method -> label, GRPO first) of runs with "method", "seed" and "evals"."""
    grpo = {r["seed"]: r for r in rs if r["method"] == "grpo"}
    lines = ["| method | seeds | sampled: start | sampled: 1st eval | sampled: final | greedy: final | rounds to "
             "3/4 of GRPO's gain (reached) | training s to it | rounds to GRPO's final (reached) | "
             "training s to it "
             "| training s / round |", "|---" * 11 + "|"]
    for m in [m for m in labels if any(r["method"] == m for r in rs)]:
        mr = sorted((r for r in rs if r["method"] == m and r["seed"] in grpo), key=lambda r: r["seed"])
        cells = []
        for frac in (0.75, 1.0):  # target per seed: start + frac * (GRPO's final - start), sampled accuracy
            reach = [rounds_to_reach(r, r["evals"][0]["accuracy_sampled"] + frac * (
                grpo[r["seed"]]["evals"][-1]["accuracy_sampled"] - r["evals"][0]["accuracy_sampled"]),
                "accuracy_sampled") for r in mr]
            got = [x for x in reach if x is not None]
            cells += [f"{ms([x[0] for x in got], '{:.0f}')} ({len(got)}/{len(reach)})",
                      ms([x[1] for x in got], "{:.0f}")]
        lines.append(
            f"| {labels[m]} | {len(mr)} | {ms([r['evals'][0]['accuracy_sampled'] for r in mr])} | "
            f"{ms([r['evals'][1]['accuracy_sampled'] for r in mr])} | "
            f"{ms([r['evals'][-1]['accuracy_sampled'] for r in mr])} | "
            f"{ms([r['evals'][-1]['accuracy'] for r in mr])} | " + " | ".join(cells)
            + f" | {ms([r['median_round_s'] for r in mr], '{:.2f}')} |")
    return "\n".join(lines)


def llm_tables(data: dict) -> dict:
    tables = {}
    runs = data["runs"]
    for setting in ("main", "n1"):
        rs = [r for r in runs if r["setting"] == setting]
        if rs:
            tables[f"llm_{setting}"] = comparison_table(rs, LLM_LABELS)
    lines = ["| setting | method | generation, s / round | update(s), s / round | generated tokens / s | "
             "train tokens / s |", "|---|---|---|---|---|---|"]
    for r_set in ("main", "n1"):
        for m in LLM_LABELS:
            mr = [r for r in runs if r["setting"] == r_set and r["method"] == m]
            if mr:
                lines.append(f"| {r_set} | {LLM_LABELS[m]} | {ms([r['median_generation_s'] for r in mr], '{:.2f}')} | "
                             f"{ms([r['median_update_s'] for r in mr], '{:.2f}')} | "
                             f"{ms([r['generation_tokens_per_s'] for r in mr], '{:.0f}')} | "
                             f"{ms([r['train_tokens_per_s'] for r in mr], '{:.0f}')} |")
    tables["llm_speed"] = "\n".join(lines)
    return tables


def curve_figure(rs: list, labels: dict, title: str, filename: str) -> None:
    """Sampled accuracy against rounds and training time, greedy accuracy against rounds; mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m, label in labels.items():
        mr = [r for r in rs if r["method"] == m]
        if not mr:
            continue
        n = min(len(r["evals"]) for r in mr)
        rounds = [e["round"] for e in mr[0]["evals"][:n]]
        for ax, key, xkey in ((axes[0], "accuracy_sampled", "round"), (axes[1], "accuracy_sampled", "time"),
                              (axes[2], "accuracy", "round")):
            ys = [[r["evals"][i][key] for r in mr] for i in range(n)]
            mean = [statistics.mean(y) for y in ys]
            sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            xs = rounds if xkey == "round" else [statistics.mean(r["evals"][i]["train_time_s"] for r in mr)
                                                 for i in range(n)]
            ax.plot(xs, mean, marker="o", ms=3, label=f"{label} ({len(mr)} seeds)")
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.2)
    axes[0].set(xlabel="generation rounds", ylabel="sampled accuracy (mean@4)")
    axes[1].set(xlabel="training wall-clock, s (evaluation excluded; 1 CPU core)", ylabel="sampled accuracy (mean@4)")
    axes[2].set(xlabel="generation rounds", ylabel="greedy accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title} (mean ± std over seeds)")
    fig.tight_layout()
    save(fig, filename)


SETTING_TITLES = {"main": "16 prompts x 8 rollouts per round", "n1": "32 prompts x 1 rollout per round"}


def llm_figures(data: dict) -> None:
    for setting, title in SETTING_TITLES.items():
        rs = [r for r in data["runs"] if r["setting"] == setting]
        if rs:
            curve_figure(rs, LLM_LABELS, f"ReVal vs GRPO, built-in task and model, {title}", f"llm_{setting}.png")


def describe(cfg: dict) -> str:
    """A tuning configuration in words: 'lr 5e-05, beta 0.1, K 2, ...'."""
    return ", ".join(str(v) if k in ("loss-type", "reward-mode") else f"{k.replace('-', ' ')} {v}"
                     .replace("learning rate", "lr").replace("updates per round", "K")
                     .replace("ref reset every", "reset every") for k, v in cfg.items())


def tuned_labels(data: dict, tune_phase: str) -> dict:
    best = {m: r["best"] for m, r in data["selections"].get(tune_phase, {}).items()}
    return {m: f"{name} ({describe(best[m])})" for m, name in (("grpo", "GRPO"), ("reval", "ReVal")) if m in best}


TUNE_ROWS = 3  # of each tuning grid, the best configurations shown in results.md


def llm_tuning_tables(data: dict) -> dict:
    tables, runs = {}, data["runs"]
    lines = ["| setting | method | configuration | validation score (mean of last 3 evals) | validation sampled, "
             "final | validation greedy, final | selected |", "|---" * 7 + "|"]
    for phase, setting in (("tune", "main"), ("n1-tune", "n1")):
        sel = data["selections"].get(phase, {})
        for method, r in sel.items():
            by_name = {x["config"]: x for x in runs if x["phase"] == phase and x["method"] == method}
            ranked = sorted(r["scores"].items(), key=lambda kv: -kv[1])
            for name, score in ranked[:TUNE_ROWS]:  # the rest: one line (all in llm_tuning.json)
                run = by_name.get(name)
                chosen = "**yes**" if name == r["best_name"] else ""
                final = run["evals"][-1] if run else {"accuracy_sampled": None, "accuracy": None}
                lines.append(f"| {setting} | {'GRPO' if method == 'grpo' else 'ReVal'} | {name} | {score:.3f} | "
                             f"{ms([final['accuracy_sampled']])} | {ms([final['accuracy']])} | {chosen} |")
            if len(ranked) > TUNE_ROWS:
                lines.append(f"| {setting} | {'GRPO' if method == 'grpo' else 'ReVal'} | {len(ranked) - TUNE_ROWS} "
                             f"more (`llm_tuning.json`) | {ranked[TUNE_ROWS][1]:.3f}-{ranked[-1][1]:.3f} | | | |")
    tables["llm_tune"] = "\n".join(lines)
    for phase, tune_phase, name in (("final", "tune", "llm_tuned_main"), ("n1-final", "n1-tune", "llm_tuned_n1")):
        rs = [r for r in runs if r["phase"] == phase]
        if rs:
            tables[name] = comparison_table(rs, tuned_labels(data, tune_phase))
    rows = beta_rows(data)
    if rows:
        lines = ["| beta | split (configuration) | seeds | sampled: final | greedy: final | sampled: round 10 |",
                 "|---" * 6 + "|"]
        for beta, split, rs in rows:
            what = "eval (tuned)" if split == "eval" else "validation (grid's base: ReVal's defaults)"
            lines.append(f"| {beta:g} | {what} | {', '.join(str(r['seed']) for r in rs)} | "
                         f"{ms([r['evals'][-1]['accuracy_sampled'] for r in rs])} | "
                         f"{ms([r['evals'][-1]['accuracy'] for r in rs])} | "
                         f"{ms([r['evals'][1]['accuracy_sampled'] for r in rs])} |")
        tables["llm_beta"] = "\n".join(lines)
    return tables


def beta_of(config: str) -> float:
    return float(re.search(r"beta([0-9.e-]+?)(?:_|$)", config).group(1))


def beta_rows(data: dict) -> list:
    """[(beta, split, runs)] for ReVal: on the eval split the tuned configuration (the beta phase's runs and the tuned
    beta's final runs); on the validation split the tuning runs of the grid's base configuration (the first of the
    grid) and those that differ from it only in beta."""
    sel = data["selections"].get("tune", {}).get("reval")
    if sel is None:
        return []

    def like(name: str):
        return re.compile("^" + re.escape(name).replace(re.escape(f"beta{beta_of(name):g}"), r"beta[0-9.e-]+") + "$")

    wanted = {"eval": (like(sel["best_name"]), ("beta", "final")), "validation": (like(next(iter(sel["scores"]))),
                                                                                   ("tune",))}
    by_key: dict = {}
    for r in data["runs"]:
        for split, (pattern, phases) in wanted.items():
            if r["method"] == "reval" and r["phase"] in phases and pattern.match(r["config"]):
                by_key.setdefault((beta_of(r["config"]), split), []).append(r)
    return [(b, split, sorted(rs, key=lambda r: r["seed"])) for (b, split), rs in sorted(by_key.items())]


def llm_tuning_figures(data: dict) -> None:
    for phase, tune_phase, setting in (("final", "tune", "main"), ("n1-final", "n1-tune", "n1")):
        rs = [r for r in data["runs"] if r["phase"] == phase]
        if rs:
            curve_figure(rs, tuned_labels(data, tune_phase), f"Tuned ReVal vs tuned GRPO, 120 rounds, "
                         f"{SETTING_TITLES[setting]}", f"llm_tuned_{setting}.png")
    rows = beta_rows(data)
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, marker in (("eval", "o"), ("validation", "s")):
        pts = [(b, rs) for b, sp, rs in rows if sp == split]
        for key, label in (("accuracy_sampled", "sampled (mean@4)"), ("accuracy", "greedy")):
            if not pts:
                continue
            ys = [[r["evals"][-1][key] for r in rs] for _, rs in pts]
            ax.errorbar([b for b, _ in pts], [statistics.mean(y) for y in ys],
                        yerr=[statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys], marker=marker, capsize=3,
                        ls="-" if split == "eval" else "--",
                        label=f"{label}, " + ("eval, tuned" if split == "eval" else "validation, defaults"))
    start = next((rs for _, sp, rs in rows if sp == "eval"), rows[0][2])[0]["evals"][0]
    ax.axhline(start["accuracy"], color="gray", ls=":", lw=1, label="greedy at the start (eval split)")
    ax.axhline(start["accuracy_sampled"], color="gray", ls="-.", lw=1, label="sampled at the start (eval split)")
    ax.set(xscale="log", xlabel="beta (reward enters Eq. 2 as r / beta)", ylabel="accuracy after 120 rounds",
           title="ReVal's beta sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "llm_beta.png")


EDIS_ARMS = {"noedis": "no EDIS", "online_only": "online only: EDIS's batches without synthetic rows",
             "paper": "EDIS as the paper", "extras": "EDIS + --edis-extras",
             "paper_bf16": "EDIS as the paper, bf16 autocast"}  # folder -> label


def arm_label(arm: str, algo: str = "", runs: list = ()) -> str:
    return EDIS_ARMS.get(arm, arm)


def edis_arms(runs: list) -> list:
    """The arms in a study, in EDIS_ARMS' order, then any others."""
    found = {r["arm"] for r in runs}
    return [a for a in EDIS_ARMS if a in found] + sorted(found - set(EDIS_ARMS))


def endpoint(run: dict) -> float:
    return statistics.mean(e["score"] for e in run["evals"][-ENDPOINT_EVALS:])


STUDY2_PAIRS = {"paper": ("noedis", "online_only"), "extras": ("noedis", "online_only", "paper"),
                "online_only": ("noedis",), "paper_bf16": ("paper",)}  # each arm against these, paired by seed


def edis_tables(data: dict, name: str = "edis") -> dict:
    """Study 2: per algorithm and arm, the endpoint (mean of the last 3 evaluations), the final evaluation, the
    training success rate, and each EDIS arm against no EDIS and against EDIS's batches without synthetic rows
    (online only), paired by seed (the same offline phase): mean ± sd, k/n better, 95 % t interval, p."""
    runs = data["runs"]
    arms = edis_arms(runs)
    lines = ["| algorithm | arm | seeds | score after offline | endpoint: last 3 evals | final eval | "
             "training success rate | paired endpoint differences |", "|---" * 8 + "|"]
    for algo in ("iql", "calql"):
        by_arm = {arm: {r["seed"]: r for r in runs if r["algo"] == algo and r["arm"] == arm} for arm in arms}
        for arm, rs in by_arm.items():
            if not rs:
                continue
            cells = []
            for ref in STUDY2_PAIRS.get(arm, ()):
                base = by_arm.get(ref, {})
                diffs = [endpoint(r) - endpoint(base[s]) for s, r in sorted(rs.items()) if s in base]
                if diffs:
                    cells.append(f"− {SHORT.get(ref, ref)}: {ms(diffs, '{:.1f}')} ({paired(diffs)})")
            vals = list(rs.values())
            lines.append(f"| {'IQL' if algo == 'iql' else 'Cal-QL'} | {arm_label(arm)} | {len(vals)} | "
                         f"{ms([r['offline_score'] for r in vals], '{:.1f}')} | "
                         f"{ms([endpoint(r) for r in vals], '{:.1f}')} | "
                         f"{ms([r['final_score'] for r in vals], '{:.1f}')} | "
                         f"{ms([1 - r['regret'] for r in vals if r['regret'] is not None], '{:.2f}')} | "
                         + "<br>".join(cells) + " |")
    lines += ["", "| algorithm | arm | offline updates / s (1 core) | online phase wall-clock, s | "
              "EDIS retrain, s each |", "|---|---|---|---|---|"]
    for algo in ("iql", "calql"):
        for arm in arms:
            rs = [r for r in runs if r["algo"] == algo and r["arm"] == arm]
            if rs:
                rt = [t for r in rs for t in r["retrain_time_s"]]
                lines.append(f"| {'IQL' if algo == 'iql' else 'Cal-QL'} | {arm_label(arm)} | "
                             f"{ms([r['offline_updates_per_s'] for r in rs], '{:.1f}')} | "
                             f"{ms([r.get('wall_s', r['online_wall_s']) for r in rs], '{:.0f}')} | "
                             f"{ms(rt, '{:.1f}') if rt and arm != 'online_only' else '–'} |")
    return {name: "\n".join(lines)}


SHORT = {"noedis": "no EDIS", "online_only": "online only", "paper": "paper"}


def success_table(data: dict) -> dict:
    """benchmarks/iql_success.py: IQL's training success around the first retrain, and the final policies acting
    as in training (sampled actions) and as in evaluation (mean action)."""
    runs = data["runs"]
    lines = ["| arm | seeds | training success before the 1st retrain | after it | by quarter of the online phase | "
             "final policy, sampled actions: success / score | mean action: success / score | actor std |",
             "|---" * 8 + "|"]
    for arm in edis_arms(runs):
        rs = [r for r in runs if r["arm"] == arm]
        q = " / ".join(ms([r["train_success_by_quarter"][i] for r in rs], "{:.2f}") for i in range(4))
        std = ms([sum(r["actor_std"]) / len(r["actor_std"]) for r in rs], "{:.2f}")
        lines.append(f"| {arm_label(arm)} | {len(rs)} | "
                     f"{ms([r['train_success_before_first_retrain'] for r in rs], '{:.2f}')} | "
                     f"{ms([r['train_success_after_first_retrain'] for r in rs], '{:.2f}')} | {q} | "
                     f"{ms([r['final_stochastic_success'] for r in rs], '{:.2f}')} / "
                     f"{ms([r['final_stochastic_score'] for r in rs], '{:.1f}')} | "
                     f"{ms([r['final_mean_success'] for r in rs], '{:.2f}')} / "
                     f"{ms([r['final_mean_score'] for r in rs], '{:.1f}')} | {std} |")
    return {"iql_success": "\n".join(lines)}


def calql_gap_table(data: dict) -> dict:
    """benchmarks/calql_gap.py: Cal-QL's CQL action gap by row source at the end of each run, per arm."""
    runs = data["runs"]
    arms = ["offline"] + edis_arms([r for r in runs if r["arm"] != "offline"])
    lines = ["| run | seeds | CQL multiplier α′ | gap on offline rows | gap on online rows | gap on synthetic rows |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if rs:
            cells = [ms([r[src]["gap"] for r in rs if src in r], "{:.2f}") if any(src in r for r in rs) else "–"
                     for src in ("offline", "online", "synthetic")]
            label = "end of the offline phase" if arm == "offline" else arm_label(arm, "calql")
            lines.append(f"| {label} | {len(rs)} | {ms([r['alpha_prime'] for r in rs], '{:.2f}')} | "
                         + " | ".join(cells) + " |")
    return {"calql_gap": "\n".join(lines)}


def edis_figures(data: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, algo in zip(axes, ("iql", "calql")):
        for arm in edis_arms(data["runs"]):
            label = arm_label(arm, algo, data["runs"])
            rs = [r for r in data["runs"] if r["algo"] == algo and r["arm"] == arm]
            if not rs:
                continue
            n = min(len(r["evals"]) for r in rs)
            xs = [e["step"] for e in rs[0]["evals"][:n]]
            ys = [[r["evals"][i]["score"] for r in rs] for i in range(n)]
            mean = [statistics.mean(y) for y in ys]
            sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(xs, mean, marker="o", ms=3, label=f"{label} ({len(rs)} seeds)")
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.2)
            ax.axvline(rs[0]["offline_steps"], color="gray", ls="--", lw=1)
        ax.set(title=f"{'IQL' if algo == 'iql' else 'Cal-QL'} on pointmaze-umaze (offline | online)",
               xlabel="offline updates, then online env steps", ylabel="D4RL normalized score")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, "edis_curves.png")


FID_COLS = [("dynamics_error_mean", "dynamics error ‖s'−sim(s,a)‖", "{:.3f}"),
            ("dynamics_error_free_mean", "dynamics error, s and s' outside walls", "{:.3f}"),
            ("dynamics_error_clear_mean", "dynamics error, s and s' clear of walls (ball radius)", "{:.3f}"),
            ("position_error_mean", "position error", "{:.3f}"),
            ("step_size_mean", "‖s'−s‖ (scale)", "{:.3f}"),
            ("reward_error_mean", "reward error", "{:.3f}"),
            ("goal_change_mean", "goal change", "{:.3f}"),
            ("states_in_walls", "states in walls", "{:.3f}"),
            ("states_overlapping_walls", "states overlapping walls", "{:.3f}"),
            ("states_touching_walls", "states touching walls (≤ 0.05)", "{:.3f}"),
            ("mmd2_to_online", "MMD² to online states", "{:.4f}"),
            ("nn_dist_to_online", "NN distance to online states", "{:.3f}"),
            ("policy_action_dist", "‖a − π(s)‖ (current policy's mean action)", "{:.3f}")]


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a b": 1}"""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k} ") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def fidelity_tables(data: dict, name: str = "fidelity") -> dict:
    seeds = data["seeds"]
    if not seeds:
        return {}
    names = [r["set"] for r in seeds[0]["rows"]]
    cols = [c for c in FID_COLS if any(c[0] in r for s in seeds for r in s["rows"])]  # older studies lack some
    lines = ["| transitions | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, row in enumerate(names):
        lines.append(f"| {row.replace('|', 'given')} | " + " | ".join(
            ms([s["rows"][i][k] for s in seeds if k in s["rows"][i]], f) for k, _, f in cols) + " |")
    speed, acc = [flat(s["samples_per_s"]) for s in seeds], [flat(s["energy_acc"]) for s in seeds]
    lines.append("")
    lines.append(f"Seeds: {len(seeds)} ({', '.join(str(s['seed']) for s in seeds)}), {seeds[0]['samples']} transitions "
                 f"per set, {seeds[0]['sample_steps']} Heun steps. Generation speed, transitions/s (1 core): "
                 + ", ".join(f"{k} {ms([s[k] for s in speed], '{:.0f}')}" for k in speed[0]) + ".")
    lines.append("")
    nested = all(isinstance(v, dict) for v in seeds[0]["energy_acc"].values())
    if not nested:  # one set of energies (the previous design's study)
        lines.append("Energy InfoNCE accuracy (chance = 1/(1+K) = 0.09): " + ", ".join(
            f"{k.replace('edis/energy_acc_', '')} {ms([s[k] for s in acc], '{:.2f}')}" for k in acc[0]) + ".")
        return {name: "\n".join(lines)}
    bands = ["0-0.1", "0.1-1", "1-5", "5-80"]
    lines.append("Held-out InfoNCE accuracy of each energy per noise band (chance = 1/(1+K) = 0.09):")
    lines.append("")
    lines.append("| variant | energy | " + " | ".join(f"σ in [{b.replace('-', ', ')})" for b in bands) + " |")
    lines.append("|---" * (len(bands) + 2) + "|")
    for variant, accs in seeds[0]["energy_acc"].items():
        for energy in [k.removeprefix("edis/energy_acc_") for k in accs if "sigma" not in k]:
            cells = [ms([s["energy_acc"][variant].get(f"edis/energy_acc_{energy}_sigma{b}") for s in seeds],
                        "{:.2f}") for b in bands]  # a short schedule may have no noise level in a band
            lines.append(f"| {variant} | {energy} | " + " | ".join(cells) + " |")
    return {name: "\n".join(lines)}


def toy_table(results: list) -> dict:
    """benchmarks/results/toy_guidance.json (from benchmarks/toy_pointmass.py): one row per form of EDIS,
    unguided -> guided, mean ± std over seeds."""
    if not results:
        return {}
    cols = [("dynamics_error", "dynamics error", "{:.4f}"), ("reward_error", "reward error", "{:.3f}"),
            ("states_in_wall", "states in wall", "{:.3f}"), ("nn_dist_to_online", "NN distance to online states",
                                                              "{:.3f}"),
            ("policy_action_error", "‖a − π(s)‖", "{:.3f}")]
    lines = ["| EDIS | seeds | " + " | ".join(f"{c[1]}: unguided → guided" for c in cols)
             + " | (r, s′, d) given real (s, a): dynamics error |", "|---" * (len(cols) + 3) + "|"]
    groups = {}
    for r in results:
        groups.setdefault("with --edis-extras" if r["extras"] else "as the paper", []).append(r)
    for form, rs in groups.items():
        cells = [f"{ms([r['unguided'][k] for r in rs], f)} → {ms([r['guided'][k] for r in rs], f)}" for k, _, f in cols]
        cond = ms([r["conditional_given_sa"]["dynamics_error"] for r in rs], "{:.4f}")
        lines.append(f"| {form} | {len(rs)} | " + " | ".join(cells) + f" | {cond} |")
    return {"toy_guidance": "\n".join(lines)}


TOY_GOAL_ARMS = {"unguided": "no guidance (same prior, same noise)", "paper": "**the paper's form, every dimension "
                 "guided** (the default before this study)",
                 "no_rd": "**reward (and terminal) not guided** (today's default)",
                 "clip": "guidance norm clipped at √D·10 per sample", "sigma5": "guidance only at σ ≤ 5",
                 "half_online": "half of every diffusion batch online", "extras": "--edis-extras (all of its parts)"}
TOY_SIZES = {"preset": "CPU preset", "undertrained": "undertrained", "toy": "small, well trained"}


def toy_goal_tables(results: list) -> dict:
    """benchmarks/results/toy_goal.json (benchmarks/toy_goal.py): each ablation's errors, and the energies' held-out
    accuracy per noise band, mean ± std over seeds."""
    cols = [("dynamics_error", "dynamics error", "{:.3f}"), ("reward_error", "reward error", "{:.3f}"),
            ("reward_bias", "reward bias", "{:.3f}"), ("states_in_wall", "states in the wall", "{:.3f}"),
            ("goal_dist_to_online_goal", "goal distance to the online goal", "{:.2f}"),
            ("policy_action_error", "‖a − π(s)‖", "{:.2f}")]
    lines = ["| sizes | guidance | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for size, label in TOY_SIZES.items():
        rs = [r for r in results if r.get("sizes") == size]
        for arm, text in TOY_GOAL_ARMS.items():
            if rs and arm in rs[0]["arms"]:
                cells = [ms([r["arms"][arm][k] for r in rs], f) for k, _, f in cols]
                lines.append(f"| {label} | {text} | {len(rs)} | " + " | ".join(cells) + " |")
    acc = ["| sizes | prior | energy | σ < 0.1 | 0.1-1 | 1-5 | 5-80 |", "|---" * 7 + "|"]
    for size, label in list(TOY_SIZES.items())[:1]:  # the CPU preset's energies
        rs = [r for r in results if r.get("sizes") == size]
        for fit in ("paper", "extras"):
            for e in ("state", "policy", "transition"):
                cells = []
                for band in ("0-0.1", "0.1-1", "1-5", "5-80"):
                    v = [r["energy_metrics"][fit].get(f"edis/energy_acc_{e}_sigma{band}") for r in rs]
                    cells.append(ms(v, "{:.2f}") if v and None not in v else "–")
                if rs:
                    acc.append(f"| {label} | {fit.replace('_', ' ')} | {e} | " + " | ".join(cells) + " |")
    return {"toy_goal": "\n".join(lines), "toy_goal_acc": "\n".join(acc)}


def round_time_table() -> dict:
    """benchmarks/results/llm_round_time.jsonl (from benchmarks/llm_round_time.sh): one row per script."""
    path = os.path.join(RESULTS, "llm_round_time.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    lines = ["| script | threads | s / round | generation s | reward s | update s | generated tokens / s | "
             "train tokens / s |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['script']} | {r['threads']} | {r['round_s']:.2f} | {r['generation_s']:.2f} | "
                     f"{r['reward_s']:.2f} | {r['update_s']:.2f} | {r['generation_tokens_per_s']:.0f} | "
                     f"{r['train_tokens_per_s']:.0f} |")
    return {"llm_round_time": "\n".join(lines)}


def speed_table() -> dict:
    """Study 4: the speed benchmarks' committed JSON (retrain_speed, peer_edis_sampler, peer_corl, compile_check)."""
    load = lambda name: json.load(open(os.path.join(RESULTS, name)))  # noqa: E731
    have = lambda name: os.path.exists(os.path.join(RESULTS, name))  # noqa: E731
    x = lambda r: f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f})"  # noqa: E731
    rows = ["| measured (nothing else running; pairs alternate) | ours | against | ratio, median (range) |",
            "|---|---|---|---|"]
    if have("retrain_speed.json"):
        d = load("retrain_speed.json")
        r, key = d["results"], "speedup_vs_baseline_fp32"
        base = r["baseline fp32"]["total_s_median"]
        for c in ("today fp32", "today bf16"):  # the --compile rows of 97e915e: quoted in the text
            if c in r:
                rows.append(f"| one EDIS retrain, CPU preset, 1 thread: {c} (`{d['commit']}`) | "
                            f"{r[c]['total_s_median']:.0f} s | {base:.0f} s, fp32 at `{d['baseline_commit']}` | "
                            f"{x(r[c][key])} |")
    if have("peer_edis_sampler.json"):
        d = load("peer_edis_sampler.json")
        for k, label in (("ours", "fp32"), ("ours_bf16", "bf16 autocast (the official code has none)")):
            rows.append(f"| guided sampler, equal work ({d['samples']} samples, {d['heun_steps']} Heun steps, 3 "
                        f"energies), 1 thread, {label} | {d['samples_per_s_median'][k]:.0f} samples/s | official "
                        f"EDIS `{d['official_commit']}`: {d['samples_per_s_median']['official']:.0f} | "
                        f"{x(d['vs_official'][k])} |")
    if have("peer_corl.json"):
        d = load("peer_corl.json")
        for key, sm in d["summary"].items():
            algo, t = key.split()
            u = sm["updates_per_s_median"]
            rows.append(f"| {'IQL' if algo == 'iql' else 'Cal-QL'} updates/s, AntMaze sizes, {t} thread"
                        f"{'s' * (t != '1')}: fp32; "
                        f"bf16 | {u['ours']:.1f}; {u['ours_bf16']:.1f} | CORL `{d['corl_commit']}`: {u['corl']:.1f}"
                        f" | {x(sm['ours_vs_corl'])}; {x(sm['ours_bf16_vs_corl'])} |")
    if have("peer_trl.json"):  # (compile_check.json, 0.65x, is quoted in the text)
        d = load("peer_trl.json")
        rows.append(f"| GRPO round (16 x 8 completions, built-in model, HF generate), 2 threads | "
                    f"{d['median_s']['ours']:.2f} s | TRL {d['versions (trl transformers torch)'].split()[0]} "
                    f"GRPOTrainer step: {d['median_s']['trl']:.2f} s | {x(d['trl_over_ours'])} |")
    return {"speed": "\n".join(rows)} if len(rows) > 2 else {}


def save(fig, name: str) -> None:
    os.makedirs(IMG, exist_ok=True)
    fig.savefig(os.path.join(IMG, name), dpi=110)
    print(f"wrote {os.path.join(IMG, name)}")


def report() -> None:
    if not os.path.exists(DOC):
        raise SystemExit(f"error: {DOC} does not exist (it holds the <!-- table:NAME --> markers to fill)")
    tables = {}
    loaders = {"llm_study.json": (llm_tables, llm_figures), "llm_tuning.json": (llm_tuning_tables, llm_tuning_figures),
               "fidelity_study.json": (fidelity_tables, None), "calql_gap.json": (calql_gap_table, None),
               "iql_success.json": (success_table, None)}
    for name, (tab, figs) in loaders.items():
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            print(f"skipped {name}: not extracted")
            continue
        data = json.load(open(path))
        tables.update(tab(data))
        if figs is not None:
            figs(data)
    study2 = load_edis_study()
    if study2["runs"]:
        tables.update(edis_tables(study2))
        edis_figures(study2)
    tables.update(round_time_table())
    tables.update(speed_table())
    toy = os.path.join(RESULTS, "toy_guidance.json")
    if os.path.exists(toy):
        tables.update(toy_table(json.load(open(toy))))
    toy16 = os.path.join(RESULTS, "toy_guidance_bf16.json")
    if os.path.exists(toy16):
        tables["toy_guidance_bf16"] = toy_table(json.load(open(toy16)))["toy_guidance"]
    goal = os.path.join(RESULTS, "toy_goal.json")
    if os.path.exists(goal):
        tables.update(toy_goal_tables(json.load(open(goal))))
    text = open(DOC).read()
    for name, body in tables.items():
        pat = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
        if not pat.search(text):
            print(f"{DOC} has no markers for table {name}; not inserted")
            continue
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    with open(DOC, "w") as f:
        f.write(text)
    print(f"updated {DOC}")


def extract() -> None:
    for fn, folder in ((extract_llm, "llm"), (extract_llm_tuning, "llm_tuning"), (extract_fidelity, "fidelity")):
        if os.path.isdir(os.path.join(RUNS, folder)):
            fn()


@dataclasses.dataclass
class Cli:
    steps: tyro.conf.Positional[tuple[Literal["extract", "report"], ...]] = ("extract", "report")
    """extract and/or report"""
    runs: str = RUNS
    """the studies' output folders"""
    results: str = RESULTS
    """where the extracted JSON goes (committed)"""
    doc: str = DOC
    """the markdown file whose table markers are filled"""
    img: str = IMG
    """where the figures go"""


def main(argv=None) -> None:
    global RUNS, RESULTS, IMG, DOC
    a = tyro.cli(Cli, args=argv, description=__doc__.split("\n\n")[0])
    RUNS, RESULTS, IMG, DOC = a.runs, a.results, a.img, a.doc
    if "extract" in a.steps:
        extract()
    if "report" in a.steps:
        report()


if __name__ == "__main__":
    main()
