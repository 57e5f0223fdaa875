"""The tree picture: every node labelled with its step, value and visits, the pair's chosen and
rejected siblings marked, and a long question wrapped inside the figure."""
from reasonrag_jax.mcts.render import _label, _pair_marks, render_tree


def node(i, parent, depth, kind, q, visits, content, children=(), terminal=False):
    return {"id": i, "parent": parent, "depth": depth, "kind": kind, "visits": visits,
            "q_value": q, "reward": q, "terminal": terminal, "children": list(children),
            "instruction": "sys", "input": f"state of {parent}", "prompt": "p",
            "response": f"<{kind}>{content}</{kind}>", "content": content,
            "prediction": content if terminal else None, "retrieved": [], "rollout_f1": []}


DUMP = {"question_id": "q1", "golden_answers": ["Oxa"],
        "question": "Where was the director of the film that won the most fictional awards in "
                    "the imaginary year of the long-running synthetic festival born? " * 3,
        "nodes": [node(0, -1, 0, "root", 0.5, 4, "", children=(1, 2)),
                  node(1, 0, 1, "query", 0.9, 3, "director of the most awarded film of the "
                       "festival", children=(3,)),
                  node(2, 0, 1, "query", 0.1, 1, "festival"),
                  node(3, 1, 2, "answer", 0.9, 2, "Oxa", terminal=True)]}


def test_labels_hold_the_step_value_and_visits():
    label = _label(DUMP["nodes"][1])
    assert label.splitlines()[0] == "query #1" and label.endswith("Q=0.90  N=3")
    assert "director of the most" in label and len(label.splitlines()) == 4   # content: 2 lines
    assert _label(DUMP["nodes"][0]).splitlines() == ["question", "Q=0.50  N=4"]


def test_the_trees_process_pair_is_marked_and_the_title_fits(tmp_path):
    assert _pair_marks(DUMP, [{"input": "state of 0", "chosen": "<query>director of the most "
                               "awarded film of the festival</query>",
                               "rejected": "<query>festival</query>"}]) == {1: "chosen",
                                                                            2: "rejected"}
    fig = render_tree(DUMP, tmp_path / "tree.png")          # default: the tree's own pairs
    assert (tmp_path / "tree.png").stat().st_size > 5000
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    box, title = fig.bbox, fig._suptitle.get_window_extent(renderer)
    assert box.x0 <= title.x0 and title.x1 <= box.x1 and title.y1 <= box.y1
    rings = fig.axes[0].collections[0].get_edgecolors()
    assert tuple(rings[1][:3]) != tuple(rings[2][:3])           # chosen and rejected differ
