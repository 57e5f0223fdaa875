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


@jax.jit
def select(t: Tree, c_uct: jax.Array) -> jax.Array:
    """The node to expand in every tree: descend from the root while the node is non-terminal
    and has all C children, to the child of highest UCT (unvisited first; first child on ties).

    Standard UCT, as in the original code: a terminal (answer) child competes like any other,
    so a good answer keeps being chosen and the caller backs its own value up again, which
    pulls its ancestors' values towards it instead of diluting them with the siblings' search.
    Batched by hand like `backup`: the loop runs until the deepest descent ends, and trees
    that stopped keep their node."""
    rows = jnp.arange(t.parent.shape[0])

    def descending(node):
        return ~t.terminal[rows, node] & jnp.all(t.children[rows, node] >= 0, axis=-1)

    def step(node):
        kids = t.children[rows, node]               # [B, C], all filled where descending
        n = jnp.maximum(t.visits[rows, node], 1).astype(jnp.float32)[:, None]
        kv = jnp.take_along_axis(t.visits, kids, axis=1).astype(jnp.float32)
        q = jnp.take_along_axis(t.value_sum, kids, axis=1) / jnp.maximum(kv, 1.0)
        score = jnp.where(kv == 0, jnp.inf,
                          q + c_uct[:, None] * jnp.sqrt(jnp.log(n) / jnp.maximum(kv, 1.0)))
        best = jnp.take_along_axis(kids, jnp.argmax(score, axis=1)[:, None], axis=1)[:, 0]
        return jnp.where(descending(node), best, node)

    return jax.lax.while_loop(lambda node: jnp.any(descending(node)), step,
                              jnp.full(rows.shape, ROOT, jnp.int32))


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


@jax.jit
def backup(t: Tree, node: jax.Array, value: jax.Array, valid: jax.Array) -> Tree:
    """Add one visit and `value` to `node` and every ancestor, in every tree where `valid`.

    Written for the whole batch rather than vmapped: the loop carries the B current nodes and
    the two statistics arrays and adds into one element per tree a step. A vmapped loop
    re-selects its whole carry every step; the vmapped on-path-mask loop this replaces took
    about 1.5x as long at B = 256 (`bench/mcts.py`)."""
    rows = jnp.arange(node.shape[0])

    def body(carry):
        n, visits, value_sum = carry
        live, at = n >= 0, jnp.maximum(n, 0)
        return (jnp.where(live, t.parent[rows, at], -1),
                visits.at[rows, at].add(live.astype(jnp.int32)),
                value_sum.at[rows, at].add(jnp.where(live, value, 0.0)))

    _, visits, value_sum = jax.lax.while_loop(
        lambda carry: jnp.any(carry[0] >= 0), body,
        (jnp.where(valid, node, -1), t.visits, t.value_sum))
    return t.replace(visits=visits, value_sum=value_sum)


# (tree, parent, kind, reward, terminal, valid), each [B] -> (tree, node [B])
add_child = jax.jit(jax.vmap(_one_add))


@functools.partial(jax.jit, donate_argnums=0)
def grow(tree: Tree, leaf, kind, reward, terminal, valid, revisit, c_uct
         ) -> tuple[Tree, jax.Array]:
    """Everything between two expansions in one call, so a search iteration costs one dispatch
    and one host round trip: add each valid new child under its leaf, back up the child's
    reward — or, where a terminal leaf was selected again (`revisit`), that leaf's own reward —
    then select the next leaf of every grown tree. → (tree, [2, B]: the new child per tree or
    -1, and the next leaf), the two stacked so that they come to the host in one transfer."""
    tree, child = add_child(tree, leaf, kind, reward, terminal, valid)
    rows = jnp.arange(leaf.shape[0])
    node = jnp.where(child >= 0, child, leaf)
    tree = backup(tree, node, tree.reward[rows, node], (child >= 0) | revisit)
    return tree, jnp.stack([child, select(tree, c_uct)])

