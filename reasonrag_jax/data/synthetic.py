"""The embedded default data: a fictional knowledge base and 1–3 hop questions over it.

Every name is invented, so no model can answer from memory: the only way to a right answer is
to retrieve the right passages, which makes the effect of better query / evidence / answer steps
visible even on a 135M model. Each question carries its gold chain (query, passage, evidence
sentence per hop), used for the SFT warm-up and to check the data is answerable.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonrag_jax.io import write_jsonl_atomic

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kl", "st", "tr", "th", "sh", "ch", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x"]
_OCCUPATIONS = ["painter", "physicist", "architect", "novelist", "composer", "film director",
                "chemist", "sculptor", "economist", "astronomer", "poet", "engineer"]


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    sentences: tuple[str, ...]

    def contents(self) -> str:
        return f"{self.title}\n{' '.join(self.sentences)}"


class _Names:
    """Pronounceable invented names, never repeated within one knowledge base."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def word(self, syllables: int) -> str:
        while True:
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                        for _ in range(syllables)).capitalize()
            if w not in self.used and 4 <= len(w) <= 11:
                self.used.add(w)
                return w

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice((2, 3)))}"


def _chain(*hops: tuple[str, Doc, str]) -> list[dict[str, str]]:
    return [{"query": q, "doc_id": d.id, "evidence": e} for q, d, e in hops]


def build_knowledge_base(seed: int = 0, num_entities: int = 300) -> tuple[list[Doc], list[dict[str, Any]]]:
    """(documents, questions) — deterministic in (seed, num_entities)."""
    rng = random.Random(seed)
    names = _Names(rng)
    n_countries = max(4, num_entities // 30)
    n_cities = max(8, num_entities // 10)
    n_orgs = max(6, num_entities // 8)
    n_works = max(10, num_entities // 4)
    n_people = max(12, num_entities - n_countries - n_cities - n_orgs - n_works)

    docs: list[Doc] = []
    countries = [names.word(3) for _ in range(n_countries)]
    cities = []
    for i in range(n_cities):
        name, country, year = names.word(2), rng.choice(countries), rng.randint(900, 1800)
        born_sentence = f"{name} is a city in {country}."
        doc = Doc(f"city-{i}", name, (born_sentence, f"It was founded in {year}."))
        cities.append({"name": name, "country": country, "doc": doc, "country_sentence": born_sentence})
        docs.append(doc)
    people = []
    for _ in range(n_people):
        name, city = names.person(), rng.choice(cities)
        year, job = rng.randint(1850, 1990), rng.choice(_OCCUPATIONS)
        born = f"{name} was born in {city['name']} in {year}."
        people.append({"name": name, "city": city, "year": year, "job": job, "born": born,
                       "sentences": [f"{name} is a {job}.", born]})
    orgs = []
    for i in range(n_orgs):
        name = f"{names.word(2)} {rng.choice(['Institute', 'Company', 'Society', 'Foundation'])}"
        founder, city, year = rng.choice(people), rng.choice(cities), rng.randint(1880, 2000)
        founded = f"{name} was founded in {year} by {founder['name']}."
        doc = Doc(f"org-{i}", name, (founded, f"Its headquarters are in {city['name']}."))
        orgs.append({"name": name, "founder": founder, "year": year, "doc": doc, "founded": founded})
        docs.append(doc)
        founder["sentences"].append(f"{founder['name']} founded {name}.")
    works = []
    nouns = ["Affair", "Garden", "Voyage", "Letters", "Winter", "Bridge"]
    for i in range(n_works):
        kind, verb = rng.choice([("film", "directed"), ("novel", "written")])
        title = f"The {names.word(2)} {rng.choice(nouns)}"
        creator, year = rng.choice(people), rng.randint(1900, 2020)
        made = f"{title} is a {year} {kind} {verb} by {creator['name']}."
        doc = Doc(f"work-{i}", title, (made,))
        works.append({"title": title, "kind": kind, "verb": verb, "creator": creator, "doc": doc,
                      "made": made})
        docs.append(doc)
    for i, p in enumerate(people):
        p["doc"] = Doc(f"person-{i}", p["name"], tuple(p["sentences"]))
        docs.append(p["doc"])

    questions: list[dict[str, Any]] = []

    def add(question: str, answer: str, qtype: str, chain: list[dict[str, str]]) -> None:
        questions.append({"question": question, "golden_answers": [answer],
                          "metadata": {"hops": len(chain), "type": qtype, "gold_chain": chain}})

    for p in people:
        c = p["city"]
        add(f"In which city was {p['name']} born?", c["name"], "attribute",
            _chain((f"{p['name']} birthplace", p["doc"], p["born"])))
        add(f"In which country was {p['name']} born?", c["country"], "composition",
            _chain((f"{p['name']} birthplace", p["doc"], p["born"]),
                   (f"{c['name']} country", c["doc"], c["country_sentence"])))
    for w in works:
        who = "director" if w["verb"] == "directed" else "author"
        cr, c = w["creator"], w["creator"]["city"]
        add(f"Who {'directed' if who == 'director' else 'wrote'} {w['title']}?", cr["name"],
            "attribute", _chain((f"{w['title']} {who}", w["doc"], w["made"])))
        add(f"Where was the {who} of {w['title']} born?", c["name"], "composition",
            _chain((f"{w['title']} {who}", w["doc"], w["made"]),
                   (f"{cr['name']} birthplace", cr["doc"], cr["born"])))
        add(f"In which country was the {who} of {w['title']} born?", c["country"], "composition",
            _chain((f"{w['title']} {who}", w["doc"], w["made"]),
                   (f"{cr['name']} birthplace", cr["doc"], cr["born"]),
                   (f"{c['name']} country", c["doc"], c["country_sentence"])))
    for o in orgs:
        add(f"Who founded {o['name']}?", o["founder"]["name"], "attribute",
            _chain((f"{o['name']} founder", o["doc"], o["founded"])))
    for _ in range(len(people) // 2):
        a, b = rng.sample(people, 2)
        if a["year"] == b["year"]:
            continue
        older = a if a["year"] < b["year"] else b
        add(f"Who was born first, {a['name']} or {b['name']}?", older["name"], "comparison",
            _chain((f"{a['name']} born", a["doc"], a["born"]),
                   (f"{b['name']} born", b["doc"], b["born"])))
    return docs, questions


def write_synthetic(out_dir: str | Path, seed: int = 0, num_entities: int = 300,
                    test_fraction: float = 0.15, dev_fraction: float = 0.1) -> dict[str, Path]:
    """Write corpus.jsonl and train/dev/test.jsonl (FlashRAG format) under `out_dir`."""
    docs, questions = build_knowledge_base(seed, num_entities)
    rng = random.Random(seed + 1)
    rng.shuffle(questions)
    n_test = int(len(questions) * test_fraction)
    n_dev = int(len(questions) * dev_fraction)
    splits = {"test": questions[:n_test], "dev": questions[n_test:n_test + n_dev],
              "train": questions[n_test + n_dev:]}
    out = Path(out_dir)
    paths = {"corpus": out / "corpus.jsonl"}
    write_jsonl_atomic(paths["corpus"], [{"id": d.id, "contents": d.contents()} for d in docs])
    for split, rows in splits.items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl_atomic(paths[split], [{"id": f"{split}-{i}", **q} for i, q in enumerate(rows)])
    return paths
