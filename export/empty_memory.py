"""The decoding graph's memory retrieval, skipped while the memory is empty.

In a sequence's first segment M = 0 and z = 0, so that the retrieval (eq 7) gives exactly 0
(0 / max(0, eps)) and the gate (eq 10) adds nothing to the local attention's term: with the
"zero" empty-memory policy A = sigmoid(beta) * 0 + (1 - sigmoid(beta)) * A_dot. Computing it
anyway costs the feature map of every query, two products and a division per layer: 6-10% of
a 1K prompt's first segment and 2-9% of a token decoded there (`small`, Intel Xeon, 2 threads,
2026-12-07, three alternated runs).

`skip_retrieval_while_empty` puts each layer's retrieval under an ONNX `If` on the graph input
`memory_empty` (the runner passes true while every row's memory is zero): its "then" branch
gives the gate's other term as it is, its "else" branch computes what the graph computed. The
nodes to move are found from the data flow, not from names:

- the layer's memory nodes: every node that reads memory_i or norm_i, directly or not;
- the gate: the first of them that all the ones before it feed, that adds (Add) a value they
  compute to one that comes from the tokens by another way (the local attention's term);
- the retrieval: the nodes that feed the gate's memory term and nothing else (the feature
  map of the queries, the products, the division, the product with sigmoid(beta)).

The rewritten graph is checked to have one such gate a layer, or the export stops (a bug).
"""
from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

FLAG = "memory_empty"


def skip_retrieval_while_empty(graph: onnx.GraphProto, layers: int) -> None:
    """Rewrite `graph` (a finalized decoding graph whose inputs include memory_i, norm_i,
    k_cache_0 and FLAG) in place: each layer's retrieval under an If on FLAG."""
    # the gate's output is in the compute dtype, the caches'
    elem_type = next(i.type.tensor_type.elem_type for i in graph.input if i.name == "k_cache_0")
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    consumers = defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n)
    from_tokens = {"input_ids"}                 # values computed from the tokens
    for n in nodes:
        if from_tokens.intersection(n.input):
            from_tokens.update(n.output)
    replaced, moved = {}, set()
    for layer in range(layers):
        gate, retrieval, other = _layer_retrieval(nodes, producer, consumers, from_tokens, layer)
        out = gate.output[0]
        skip = helper.make_graph(
            [helper.make_node("Identity", [other], [f"{out}/skipped"])],
            f"layers.{layer}/memory_empty", [],
            [helper.make_tensor_value_info(f"{out}/skipped", elem_type, None)])
        read = helper.make_graph([*retrieval, gate], f"layers.{layer}/memory_read", [],
                                 [helper.make_tensor_value_info(out, elem_type, None)])
        replaced[id(gate)] = helper.make_node(
            "If", [FLAG], [out], name=f"/layers.{layer}/attn/memory_if",
            then_branch=skip, else_branch=read)
        moved.update(id(n) for n in retrieval)
    del graph.node[:]
    graph.node.extend(replaced.get(id(n), n) for n in nodes if id(n) not in moved)


def _layer_retrieval(nodes, producer, consumers, from_tokens, layer):
    """(the gate node, the retrieval's nodes in graph order, the gate's other input) of one
    layer; RuntimeError where the graph is not of that form."""
    reads = {f"memory_{layer}", f"norm_{layer}"}
    memory_nodes = []
    for n in nodes:
        if reads.intersection(n.input):
            reads.update(n.output)
            memory_nodes.append(n)
    for k, n in enumerate(memory_nodes):
        made = [i for i in n.input if i in reads and i in producer]
        others = [i for i in n.input if i in from_tokens and i not in reads]
        if n.op_type != "Add" or len(made) != 1 or len(others) != 1:
            continue
        before = _ancestors(n, producer)
        if all(id(m) in before for m in memory_nodes[:k]):
            gate, term, other = n, made[0], others[0]
            break
    else:
        raise RuntimeError(f"layer {layer}: no gate of the memory retrieval in the decoding "
                           f"graph")
    retrieval = {id(producer[term]): producer[term]}
    grown = True
    while grown:                    # the nodes whose every output feeds only the retrieval
        grown = False
        for node in list(retrieval.values()):
            for i in node.input:
                p = producer.get(i)
                if p is None or id(p) in retrieval:
                    continue
                if all(id(c) in retrieval or c is gate for o in p.output for c in consumers[o]):
                    retrieval[id(p)] = p
                    grown = True
    if not any(f"memory_{layer}" in n.input for n in retrieval.values()):
        raise RuntimeError(f"layer {layer}: the gate's memory term does not read memory_{layer}")
    return gate, [n for n in nodes if id(n) in retrieval], other


def _ancestors(node, producer) -> set[int]:
    seen, stack = set(), [node]
    while stack:
        for i in stack.pop().input:
            p = producer.get(i)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                stack.append(p)
    return seen
