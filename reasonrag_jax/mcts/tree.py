"""A batch of search trees as fixed-shape arrays, with pure jitted select / add / backup.

B trees of N = max_rollouts + 1 nodes and at most C children per node live in [B, N] and
[B, N, C] arrays (-1 marks "none"), so one call advances every tree at once and the bookkeeping
costs microseconds per iteration whatever B is. The text of each node (its Episode) lives in a
host-side table keyed by (tree, node); the arrays hold only numbers.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

ROOT = 0
KINDS = ("root", "query", "evidence", "answer")   # kind codes 0..3


class Tree(flax.struct.PyTreeNode):
    """B trees of N nodes with C child slots each; every field is listed with its shape."""
    parent: jax.Array       # [B, N] int32: parent node, -1 for the root and unused nodes
    depth: jax.Array        # [B, N] int32: steps from the root
    kind: jax.Array         # [B, N] int32: index into KINDS
    visits: jax.Array       # [B, N] int32: backups through the node
    value_sum: jax.Array    # [B, N] float32: sum of backed-up values
    reward: jax.Array       # [B, N] float32: the node's own SPRE estimate
    terminal: jax.Array     # [B, N] bool: the episode ends at this node (answer step)
    children: jax.Array     # [B, N, C] int32: child nodes in creation order, -1 for none
    num_nodes: jax.Array    # [B] int32: nodes in use (node ids 0..num_nodes-1)

    @property
    def q_value(self) -> jax.Array:   # [B, N]
        return self.value_sum / jnp.maximum(self.visits, 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init(batch: int, num_nodes: int, max_children: int) -> Tree:
    """B trees holding only their root (N = num_nodes = rollout budget + 1, C = max_children)."""
    i32 = lambda v: jnp.full((batch, num_nodes), v, jnp.int32)  # noqa: E731
    return Tree(parent=i32(-1), depth=i32(0), kind=i32(0), visits=i32(0),
                value_sum=jnp.zeros((batch, num_nodes), jnp.float32),
                reward=jnp.zeros((batch, num_nodes), jnp.float32),
                terminal=jnp.zeros((batch, num_nodes), bool),
                children=jnp.full((batch, num_nodes, max_children), -1, jnp.int32),
                num_nodes=jnp.ones((batch,), jnp.int32))


def _per_tree(fn):
    """vmap a single-tree function over the batch axis, then jit it."""
    return jax.jit(jax.vmap(fn))


def _one_select(t: Tree, c_uct: jax.Array) -> jax.Array:
    """The node to expand: descend from the root while the node is non-terminal and has all C
    children, to the child of highest UCT (unvisited first; first child on ties).

    Standard UCT, as in the original code: a terminal (answer) child competes like any other,
    so a good answer keeps being chosen and the caller backs its own value up again, which
    pulls its ancestors' values towards it instead of diluting them with the siblings' search."""

    def descend(node):
        return ~t.terminal[node] & jnp.all(t.children[node] >= 0)

    def step(node):
        kids = t.children[node]
        safe = jnp.maximum(kids, 0)
        n = jnp.maximum(t.visits[node], 1).astype(jnp.float32)
        kv = t.visits[safe].astype(jnp.float32)
        q = t.value_sum[safe] / jnp.maximum(kv, 1.0)
        score = jnp.where(kv == 0, jnp.inf, q + c_uct * jnp.sqrt(jnp.log(n) / jnp.maximum(kv, 1.0)))
        return kids[jnp.argmax(score)]            # every slot is filled here

    return jax.lax.while_loop(descend, step, jnp.int32(ROOT))


def _one_add(t: Tree, parent, kind, reward, terminal, valid) -> tuple[Tree, jax.Array]:
    """Append a child of `parent` (if `valid` and there is room); returns its id or -1."""
    node = t.num_nodes
    slot = jnp.argmax(t.children[parent] < 0)
    ok = valid & (node < t.parent.shape[0]) & (t.children[parent, slot] < 0) & ~t.terminal[parent]
    idx = jnp.where(ok, node, t.parent.shape[0])  # out of range → dropped writes
    t = t.replace(
        parent=t.parent.at[idx].set(parent, mode="drop"),
        depth=t.depth.at[idx].set(t.depth[parent] + 1, mode="drop"),
        kind=t.kind.at[idx].set(kind, mode="drop"),
        reward=t.reward.at[idx].set(reward, mode="drop"),
        terminal=t.terminal.at[idx].set(terminal, mode="drop"),
        children=t.children.at[parent, slot].set(jnp.where(ok, node, t.children[parent, slot])),
        num_nodes=t.num_nodes + ok.astype(jnp.int32))
    return t, jnp.where(ok, node, -1)


def _one_backup(t: Tree, node, value, valid) -> Tree:
    """Add one visit and `value` to `node` and every ancestor.

    The loop walks parent pointers carrying only the node and an on-path mask; the statistics
    are then updated in one vectorised add (a loop carrying the whole tree costs 3x more).
    """

    def body(carry):
        n, path = carry
        return t.parent[n], path | (jnp.arange(path.shape[0]) == n)

    start = jnp.where(valid, node, -1)
    _, path = jax.lax.while_loop(lambda c: c[0] >= 0, body,
                                 (start, jnp.zeros(t.parent.shape, bool)))
    return t.replace(visits=t.visits + path.astype(jnp.int32),
                     value_sum=t.value_sum + jnp.where(path, value, 0.0))


# All arguments are batched: [B] per tree.
select = _per_tree(_one_select)       # (tree, c_uct) -> node
add_child = _per_tree(_one_add)       # (tree, parent, kind, reward, terminal, valid) -> tree, node
backup = _per_tree(_one_backup)       # (tree, node, value, valid) -> tree


@functools.partial(jax.jit, donate_argnums=0)
def grow(tree: Tree, leaf, kind, reward, terminal, valid, revisit, c_uct
         ) -> tuple[Tree, jax.Array, jax.Array]:
    """Everything between two expansions in one call, so a search iteration costs one dispatch
    and one host round trip: add each valid new child under its leaf, back up the child's
    reward — or, where a terminal leaf was selected again (`revisit`), that leaf's own reward —
    then select the next leaf of every grown tree. → (tree, new child per tree or -1, next leaf)."""
    tree, child = add_child(tree, leaf, kind, reward, terminal, valid)
    rows = jnp.arange(leaf.shape[0])
    node = jnp.where(child >= 0, child, leaf)
    tree = backup(tree, node, tree.reward[rows, node], (child >= 0) | revisit)
    return tree, child, select(tree, c_uct)

