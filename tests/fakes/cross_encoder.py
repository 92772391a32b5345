"""A tiny ONNX cross-encoder made for tests (no model ships in a package): the same inputs and output as a
BERT sequence-classification export — `input_ids`, `attention_mask`, `token_type_ids` in, logits `(batch, 1)`
out — scoring a pair by the cosine of its two sides' bags of word pieces (random 128-d vectors per piece,
[PAD]/[CLS]/[SEP] zero). So a document that shares the query's words scores higher, deterministically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOKENIZER = Path(__file__).resolve().parents[2] / "keel/gateway/providers/local_embed_tokenizer.json"
VOCAB, DIM = 30522, 128


def build(directory: Path, stopwords: tuple[int, ...] = ()) -> Path:
    """Write `model.onnx` and `tokenizer.json` (the bundled embedder's WordPiece) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    table = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
    table[[0, 100, 101, 102, 103, *stopwords]] = 0.0
    inits = [numpy_helper.from_array(table, "E"), numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1], np.int64), "axlast"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    n = helper.make_node
    nodes = [
        n("Gather", ["E", "input_ids"], ["emb"]),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Cast", ["token_type_ids"], ["typef"], to=TensorProto.FLOAT),
        n("Mul", ["typef", "maskf"], ["dw"]),
        n("Sub", ["one", "typef"], ["qt"]),
        n("Mul", ["qt", "maskf"], ["qw"]),
        n("Unsqueeze", ["qw", "axlast"], ["qw3"]),
        n("Unsqueeze", ["dw", "axlast"], ["dw3"]),
        n("Mul", ["emb", "qw3"], ["qe"]),
        n("Mul", ["emb", "dw3"], ["de"]),
        n("ReduceSum", ["qe", "ax1"], ["qv"], keepdims=0),
        n("ReduceSum", ["de", "ax1"], ["dv"], keepdims=0),
        n("Mul", ["qv", "dv"], ["qd"]),
        n("ReduceSum", ["qd", "axlast"], ["dot"], keepdims=1),
        n("Mul", ["qv", "qv"], ["qq"]),
        n("ReduceSum", ["qq", "axlast"], ["qn2"], keepdims=1),
        n("Mul", ["dv", "dv"], ["dd"]),
        n("ReduceSum", ["dd", "axlast"], ["dn2"], keepdims=1),
        n("Mul", ["qn2", "dn2"], ["n2"]),
        n("Sqrt", ["n2"], ["norm"]),
        n("Add", ["norm", "eps"], ["normeps"]),
        n("Div", ["dot", "normeps"], ["logits"]),
    ]
    ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
            for name in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(nodes, "bag_cross_encoder", ints, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    shutil.copy(TOKENIZER, directory / "tokenizer.json")
    return directory
