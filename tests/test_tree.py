"""Array tree operations equal a plain-Python object tree on random operation sequences."""
import math

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from reasonrag_jax.mcts import tree as T


class Node:
    def __init__(self, parent=None, depth=0, terminal=False):
        self.parent, self.depth, self.terminal = parent, depth, terminal
        self.children, self.visits, self.value_sum = [], 0, 0.0


def exhausted(node, max_children):
    return node.terminal or (len(node.children) == max_children and
                             all(exhausted(c, max_children) for c in node.children))


def py_select(root, c, max_children):
    node = root
    while not node.terminal and len(node.children) == max_children:
        log_n = math.log(max(node.visits, 1))
        live = [ch for ch in node.children if not exhausted(ch, max_children)] or node.children
        node = max(live, key=lambda ch, log_n=log_n: math.inf if ch.visits == 0 else
                   ch.value_sum / ch.visits + c * math.sqrt(log_n / ch.visits))  # first best
    return node


def py_backup(node, value):
    while node is not None:
        node.visits += 1
        node.value_sum += value
        node = node.parent


# Dyadic values keep value sums exact in float32 (the arrays) and float64 (the reference), so a
# comparison of UCT scores never flips on rounding.
ops = st.lists(st.tuples(st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.625, 0.75, 1.0]), st.booleans()),
               min_size=1, max_size=24)


@settings(max_examples=20, deadline=None)
@given(st.lists(ops, min_size=2, max_size=2), st.integers(1, 3))
def test_batched_tree_matches_python_trees(sequences, max_children):
    num_nodes = 12
    b = len(sequences)
    tree = T.init(b, num_nodes, max_children)
    roots = [Node() for _ in range(b)]
    nodes = [[r] for r in roots]
    steps = max(len(s) for s in sequences)
    for i in range(steps):
        leaf = np.asarray(T.select(tree, jnp.full((b,), 1.4)))
        want = [py_select(r, 1.4, max_children) for r in roots]
        assert [nodes[j].index(w) for j, w in enumerate(want)] == leaf.tolist()
        values = np.array([s[i][0] if i < len(s) else 0.0 for s in sequences], np.float32)
        terminal = np.array([s[i][1] if i < len(s) else False for s in sequences])
        active = np.array([i < len(s) for s in sequences])
        valid = active & ~np.array([w.terminal for w in want])
        tree, child = T.add_child(tree, jnp.asarray(leaf), jnp.ones(b, jnp.int32),
                                  jnp.asarray(values),
                                  jnp.asarray(terminal), jnp.asarray(valid))
        child = np.asarray(child)
        for j in range(b):
            if valid[j] and len(nodes[j]) < num_nodes:
                new = Node(want[j], want[j].depth + 1, bool(terminal[j]))
                want[j].children.append(new)
                nodes[j].append(new)
                assert child[j] == len(nodes[j]) - 1
                py_backup(new, float(values[j]))
            else:
                assert child[j] == -1
        tree = T.backup(tree, jnp.asarray(np.maximum(child, 0)), jnp.asarray(values),
                        jnp.asarray(child >= 0))
    for j in range(b):
        n = len(nodes[j])
        assert int(tree.num_nodes[j]) == n
        assert np.asarray(tree.visits[j, :n]).tolist() == [x.visits for x in nodes[j]]
        np.testing.assert_allclose(np.asarray(tree.value_sum[j, :n]),
                                   [x.value_sum for x in nodes[j]],
                                   rtol=1e-5, atol=1e-5)
        assert np.asarray(tree.depth[j, :n]).tolist() == [x.depth for x in nodes[j]]
        parents = [nodes[j].index(x.parent) if x.parent else -1 for x in nodes[j]]
        assert np.asarray(tree.parent[j, :n]).tolist() == parents


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 10), (3, 6)]))
def test_iteration_matches_python_search(seed, shape):
    """select + add child + back up, with a selected answer node re-backed-up with its own
    reward, as the search loop and the benchmark run it."""
    (max_children, num_nodes), b, steps = shape, 3, 24
    rng = np.random.default_rng(seed)
    rewards = rng.random((steps, b), dtype=np.float32)
    terminal = rng.random((steps, b)) < 0.3
    tree = T.init(b, num_nodes, max_children)
    roots = [Node() for _ in range(b)]
    nodes = [[r] for r in roots]
    for i in range(steps):
        tree, leaf, child = T.iteration(tree, jnp.full((b,), 0.7), jnp.full((b,), 2, jnp.int32),
                                        jnp.asarray(rewards[i]), jnp.asarray(terminal[i]))
        leaf, child = np.asarray(leaf), np.asarray(child)
        for j in range(b):
            node = py_select(roots[j], 0.7, max_children)
            assert nodes[j].index(node) == int(leaf[j])
            if not node.terminal and len(nodes[j]) < num_nodes:
                new = Node(node, node.depth + 1, bool(terminal[i, j]))
                new.reward = float(rewards[i, j])
                node.children.append(new)
                nodes[j].append(new)
                node = new
            assert int(child[j]) == (nodes[j].index(node) if node is nodes[j][-1] and
                                     node.parent is not None and node.visits == 0 else -1)
            py_backup(node, getattr(node, "reward", 0.0))
    for j in range(b):
        n = len(nodes[j])
        assert np.asarray(tree.visits[j, :n]).tolist() == [x.visits for x in nodes[j]]
        np.testing.assert_allclose(np.asarray(tree.value_sum[j, :n]),
                                   [x.value_sum for x in nodes[j]], rtol=1e-5, atol=1e-5)
        assert np.asarray(tree.terminal[j, :n]).tolist() == [x.terminal for x in nodes[j]]
        assert np.asarray(tree.exhausted[j, :n]).tolist() == [exhausted(x, max_children)
                                                              for x in nodes[j]]
        assert np.asarray(tree.kind[j, 1:n]).tolist() == [2] * (n - 1)
        kids = np.asarray(tree.children[j, :n]).tolist()
        assert kids == [[nodes[j].index(c) for c in x.children] +
                        [-1] * (max_children - len(x.children)) for x in nodes[j]]
