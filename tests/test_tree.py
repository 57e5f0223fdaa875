"""Array tree operations equal a plain-Python object tree on random operation sequences, and
standard UCT (an answer node is selected again) gives hand-computed visits and values."""
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


def py_select(root, c, max_children):
    node = root
    while not node.terminal and len(node.children) == max_children:
        log_n = math.log(max(node.visits, 1))
        node = max(node.children, key=lambda ch, log_n=log_n: math.inf if ch.visits == 0 else
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


def iterations(tree, c, kinds, rewards, terminals):
    """Iterations as `search` runs them: one `select`, then per iteration one `grow` that adds
    the new child under the selected leaf (a selected answer node, or the leaf of a full tree,
    is backed up again instead) and selects the next leaf.
    → (final tree, selected leaf [steps, B], new child [steps, B])."""
    leaf, leaves, children = T.select(tree, c), [], []
    for kind, reward, terminal in zip(kinds, rewards, terminals):
        at_end = tree.terminal[jnp.arange(leaf.shape[0]), leaf]
        leaves.append(np.asarray(leaf))
        tree, (child, leaf) = T.grow(tree, leaf, kind, reward, terminal, ~at_end,
                                     jnp.ones_like(at_end), c)
        children.append(np.asarray(child))
    return tree, np.stack(leaves), np.stack(children)


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
    tree, leaves, children = iterations(tree, jnp.full((b,), 0.7),
                                        [jnp.full((b,), 2, jnp.int32)] * steps,
                                        jnp.asarray(rewards), jnp.asarray(terminal))
    for i, (leaf, child) in enumerate(zip(leaves, children)):
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
        assert np.asarray(tree.kind[j, 1:n]).tolist() == [2] * (n - 1)
        kids = np.asarray(tree.children[j, :n]).tolist()
        assert kids == [[nodes[j].index(c) for c in x.children] +
                        [-1] * (max_children - len(x.children)) for x in nodes[j]]



def test_uct_selection_by_hand():
    # Root: 10 visits. Node 1 (an answer): 3 visits, value sum 1.5; node 2: 7 visits, sum 4.9.
    # UCT = Q + c * sqrt(ln 10 / n), ln 10 = 2.302585:
    #   c = 1.4: node 1 = 0.5 + 1.4 * sqrt(0.767528) = 0.5 + 1.4 * 0.876087 = 1.7265
    #            node 2 = 0.7 + 1.4 * sqrt(0.328941) = 0.7 + 1.4 * 0.573534 = 1.5029 → node 1
    #   c = 0.5: node 1 = 0.5 + 0.438044 = 0.9380; node 2 = 0.7 + 0.286767 = 0.9868 → node 2
    tree = T.init(2, 3, 2)
    for terminal in (True, False):
        tree, _ = T.add_child(tree, jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32),
                              jnp.zeros(2), jnp.full(2, terminal), jnp.ones(2, bool))
    tree = tree.replace(visits=jnp.array([[10, 3, 7]] * 2, jnp.int32),
                        value_sum=jnp.array([[6.4, 1.5, 4.9]] * 2, jnp.float32))
    assert np.asarray(T.select(tree, jnp.array([1.4, 0.5]))).tolist() == [1, 2]


def test_answer_node_is_selected_again_by_hand():
    """A scripted tree where answering at once is right: 8 iterations at c = 1.

    it 1: root has no child → add answer A (node 1, terminal, reward 0.9); back up 0.9.
    it 2: root has 1 of 2 children → add query B (node 2, reward 0.1); back up 0.1.
    Root full from here; UCT(A) = 0.9 + sqrt(ln N / n_A), UCT(B) = 0.1 + sqrt(ln N / 1):
    it 3: N=2: A 0.9 + 0.8326 = 1.7326 > B 0.1 + 0.8326 → A again, back up 0.9 (n_A = 2)
    it 4: N=3: A 0.9 + sqrt(1.0986/2) = 1.6412 > B 0.1 + 1.0481 = 1.1481 → A (n_A = 3)
    it 5: N=4: A 0.9 + sqrt(1.3863/3) = 1.5798 > B 0.1 + 1.1774 = 1.2774 → A (n_A = 4)
    it 6: N=5: A 0.9 + sqrt(1.6094/4) = 1.5343 > B 0.1 + 1.2686 = 1.3686 → A (n_A = 5)
    it 7: N=6: A 0.9 + sqrt(1.7918/5) = 1.4986 > B 0.1 + 1.3386 = 1.4386 → A (n_A = 6)
    it 8: N=7: A 0.9 + sqrt(1.9459/6) = 1.4695 < B 0.1 + 1.3950 = 1.4950 → B, which has no
          child yet: add evidence C (node 3, reward 0.2) under B, back up 0.2.
    Visits: root 8, A 6, B 2, C 1. Value sums: root 6 * 0.9 + 0.1 + 0.2 = 5.7, A 5.4,
    B 0.3, C 0.2 → Q: root 0.7125, A 0.9, B 0.15, C 0.2. (Skipping A once it exists — the
    old "exhausted" rule — would grow B's subtree from iteration 3 on and give A 1 visit.)
    """
    script = [(3, 0.9, True), (1, 0.1, False)] + [(1, 0.5, False)] * 5 + [(2, 0.2, False)]
    tree = T.init(1, 9, 2)
    kinds, rewards, terminals = ([jnp.array([x]) for x in column] for column in zip(*script))
    tree, leaves, children = iterations(tree, jnp.ones(1), kinds, rewards, terminals)
    assert leaves[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 2]
    assert children[:, 0].tolist() == [1, 2, -1, -1, -1, -1, -1, 3]
    assert int(tree.num_nodes[0]) == 4
    assert np.asarray(tree.visits[0, :4]).tolist() == [8, 6, 2, 1]
    np.testing.assert_allclose(np.asarray(tree.q_value[0, :4]), [0.7125, 0.9, 0.15, 0.2],
                               atol=1e-6)
    assert np.asarray(tree.parent[0, :4]).tolist() == [-1, 0, 0, 2]
