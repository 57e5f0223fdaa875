"""The embedded default data: a fictional knowledge base and 1–3 hop questions over it.

Every name is invented (a syllable generator, screened against famous real names), so no model
can answer from memory: the only way to a right answer is to retrieve the right passages, which
makes the effect of better query / evidence / answer steps visible even on a 135M model.

Each entity (country, city, person, organisation, work) has exactly one passage, a few natural
sentences, and each fact is stated in exactly one passage, so every hop of a question needs one
specific retrieval. Each question carries its gold chain — per hop the query to issue, the
passage that answers it and the evidence sentence — used for the SFT warm-up and to prove the
data answerable.

Everything is a pure function of `seed` (private `random.Random` instances, never the global
one), so the same seed gives byte-identical files.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonrag_jax.io import write_jsonl_atomic

# ---------------------------------------------------------------------------------------------
# Invented names

# Mostly single consonants and vowels: names stay short and pronounceable, so a small model's
# tokenizer splits them into few pieces it can copy from a passage into a query or an answer.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "h", "j",
           "br", "dr", "kr", "st", "th", "sh", "tr", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou")
_CODAS = ("", "", "n", "n", "r", "r", "l", "s", "m", "th", "nd", "sk", "x")
_COUNTRY_ENDINGS = ("nia", "ria", "vania", "stan", "desh", "mora", "gard")
# Real names the generator can spell (cities, countries, given names) and the fixed vocabulary of
# the templates below: a generated word equal to one of them is redrawn.
_RESERVED = frozenset("""
paris rome berlin madrid london boston dallas denver austin milan lima oslo kiev riga sofia
delhi dubai doha seoul tokyo kobe osaka dublin sydney perth derby leeds york bern basel turin
genoa pisa lyon nice porto braga malta cuba chad mali peru iran iraq oman niger kenya ghana
nepal tonga samoa fiji china india japan korea syria libya sudan yemen spain italy greece
brazil chile norway sweden finland poland russia france monaco gabon benin togo zambia
maria anna linda susan karen nancy lisa laura sara sarah emma mia ella nora lara dora vera
tina rita gina lena nina mona rosa julia diana elena irene helen daniel david peter paul
thomas martin simon steven kevin brian jason ryan sean adam mark eric derek dennis kern
marco mario luca pablo diego carlos jose juan ivan boris igor oleg yuri anton viktor
mozart bach verdi dante homer plato kant marx darwin newton tesla edison gandhi lenin
stalin nixon obama trump biden bush lincoln kennedy madonna shakira prince elvis
film novel studio press books company institute society foundation city country capital
garden voyage letters winter bridge summer harbour mirror shadow river lantern archive
born first director author founder year chafe chute chakra bazar kane
""".split())


class _Names:
    """Pronounceable invented words, unique in one knowledge base and never a substring of one
    another (so an answer "Tomar" is never inside another entity's name "Tomaris")."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []

    def word(self, syllables: int, ending: str = "") -> str:
        while True:
            # Open syllables with a closing consonant only at the end: no "skp" clusters.
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS)
                        for _ in range(syllables)) + (ending or self.rng.choice(_CODAS))
            if not 5 <= len(w) <= 10 or w in _RESERVED:
                continue
            if any(w in u or u in w for u in self.used):
                continue
            self.used.append(w)
            return w.capitalize()


# ---------------------------------------------------------------------------------------------
# Knowledge base

_OCCUPATIONS = ("painter", "physicist", "architect", "composer", "chemist", "sculptor",
                "economist", "astronomer", "poet", "engineer", "botanist", "historian")
_ORG_KINDS = {  # kind → (words that end its name, how its passage describes it)
    "studio": (("Studios", "Pictures"), "film studio"),
    "publisher": (("Press", "Books"), "publishing house"),
    "company": (("Company", "Industries"), "company"),
    "institute": (("Institute",), "research institute"),
    "society": (("Society",), "learned society"),
    "foundation": (("Foundation",), "charitable foundation"),
}
_WORK_NOUNS = ("Garden", "Voyage", "Letters", "Winter", "Bridge", "Summer", "Harbour", "Mirror",
               "Shadow", "River", "Lantern", "Archive")
_COUNTRY_TRAITS = ("a mountainous country with many lakes", "a small country on a long coast",
                   "a country of wide plains and old forests", "an island country",
                   "a country crossed by three great rivers", "a landlocked country in the hills")
_CITY_TRAITS = ("its old stone bridges", "a busy river port", "its spring flower market",
                "a large university", "its narrow painted streets", "a famous clock tower",
                "its textile mills", "a harbour full of fishing boats")
_PERSON_TRAITS = ("a quiet and patient manner", "long walks before dawn",
                  "a large collection of maps", "generous help to young colleagues",
                  "a habit of working late at night", "letters written to friends every week")
_PLOTS = ("a young clerk who inherits a ruined house", "two sisters who cross a frozen sea",
          "a doctor who returns to her home village", "a thief who falls in love with a judge",
          "an old sailor looking for a lost son", "a family that hides a stranger for a winter")


@dataclass(frozen=True)
class Doc:
    """One corpus passage; FlashRAG's `contents` is "Title\\ntext"."""
    id: str
    title: str
    sentences: tuple[str, ...]

    @property
    def contents(self) -> str:
        return f"{self.title}\n{' '.join(self.sentences)}"


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    doc: Doc
    capital_fact: str


@dataclass(frozen=True)
class City:
    name: str
    country: str
    founded: int
    doc: Doc
    country_fact: str          # "{city} is a city in {country}."
    founded_fact: str


@dataclass(frozen=True)
class Person:
    name: str
    year: int
    city: str
    occupation: str
    employer: str
    doc: Doc
    born_fact: str             # "{name} was born in {city} in {year}."
    employer_fact: str


@dataclass(frozen=True)
class Org:
    name: str
    kind: str
    founded: int
    founder: str
    city: str
    doc: Doc
    founded_fact: str          # "{org} is a … founded in {year} by {founder}."
    hq_fact: str


@dataclass(frozen=True)
class Work:
    title: str
    kind: str                  # "film" | "novel"
    year: int
    creator: str
    producer: str
    doc: Doc
    made_fact: str             # "{title} is a {year} film directed by {creator}."
    producer_fact: str

    @property
    def creator_role(self) -> str:
        return "director" if self.kind == "film" else "author"

    @property
    def producer_role(self) -> str:
        return "studio that produced" if self.kind == "film" else "publisher of"


@dataclass(frozen=True)
class KnowledgeBase:
    """Entities by name, in generation order; `docs` is the corpus, one passage per entity."""
    countries: dict[str, Country]
    cities: dict[str, City]
    people: dict[str, Person]
    orgs: dict[str, Org]
    works: dict[str, Work]

    @property
    def docs(self) -> list[Doc]:
        return [e.doc for group in (self.countries, self.cities, self.people, self.orgs,
                                    self.works) for e in group.values()]


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _entity_counts(n: int) -> tuple[int, int, int, int, int]:
    """(countries, cities, people, orgs, works) adding up to `n`: about 4/16/40/14/26 %."""
    countries = max(2, n // 25)
    cities = max(2 * countries, n * 16 // 100)
    orgs = max(2, n * 14 // 100)      # kinds are dealt in order: a studio and a publisher first
    works = max(2, n * 26 // 100)
    return countries, cities, n - countries - cities - orgs - works, orgs, works


def build_knowledge_base(seed: int = 0, num_entities: int = 300) -> KnowledgeBase:
    """A fictional world of `num_entities` entities, a pure function of its arguments."""
    if num_entities < 20:
        raise ValueError(f"num_entities must be at least 20, got {num_entities}")
    rng = random.Random(f"reasonrag-synthetic-kb:{seed}")
    names = _Names(rng)
    n_countries, n_cities, n_people, n_orgs, n_works = _entity_counts(num_entities)

    # Names first: facts refer to each other in both directions (founders work for orgs).
    country_names = [names.word(2, rng.choice(_COUNTRY_ENDINGS)) for _ in range(n_countries)]
    city_names = [names.word(rng.choice((2, 2, 3))) for _ in range(n_cities)]
    person_names = [f"{names.word(2)} {names.word(rng.choice((2, 3)))}" for _ in range(n_people)]
    org_kinds = [list(_ORG_KINDS)[i % len(_ORG_KINDS)] for i in range(n_orgs)]
    org_names = [f"{names.word(2)} {rng.choice(_ORG_KINDS[k][0])}" for k in org_kinds]
    work_kinds = [("film", "novel")[i % 2] for i in range(n_works)]
    work_titles = [f"The {names.word(2)} {rng.choice(_WORK_NOUNS)}" for _ in range(n_works)]

    # Every country's capital is its own first city; the other cities are spread at random.
    city_country = country_names + [rng.choice(country_names)
                                    for _ in range(n_cities - n_countries)]
    cities: dict[str, City] = {}
    for i, (name, country) in enumerate(zip(city_names, city_country)):
        founded = rng.randint(800, 1850)
        country_fact = f"{name} is a city in {country}."
        founded_fact = f"{name} was founded in {founded}."
        trait = f"The city is known for {rng.choice(_CITY_TRAITS)}."
        population = f"About {rng.randint(20, 900) * 1000} people live there."
        doc = Doc(f"city-{i:04d}", name, (country_fact, founded_fact, trait, population))
        cities[name] = City(name, country, founded, doc, country_fact, founded_fact)

    countries: dict[str, Country] = {}
    for i, (name, capital) in enumerate(zip(country_names, city_names)):
        capital_fact = f"The capital of {name} is {capital}."
        independent = f"{name} became independent in {rng.randint(1200, 1950)}."
        doc = Doc(f"country-{i:04d}", name,
                  (f"{name} is {rng.choice(_COUNTRY_TRAITS)}.", capital_fact, independent))
        countries[name] = Country(name, capital, doc, capital_fact)

    # About one in eight is a film director and one in eight a novelist (the works' creators);
    # people 0 and 1 make sure there is at least one of each.
    creator_jobs = ("film director", "novelist")
    jobs = [*creator_jobs] + [rng.choice(creator_jobs * 2 + _OCCUPATIONS)
                              for _ in range(n_people - 2)]
    years = [rng.randint(1850, 1960) for _ in range(n_people)]
    people: dict[str, Person] = {}
    for i, (name, year, job) in enumerate(zip(person_names, years, jobs)):
        city, employer, surname = rng.choice(city_names), rng.choice(org_names), name.split()[1]
        born_fact = f"{name} was born in {city} in {year}."
        employer_fact = f"{surname} works for {employer}."
        doc = Doc(f"person-{i:04d}", name, (
            born_fact, f"{surname} is {_with_article(job)}.", employer_fact,
            f"{surname} is known for {rng.choice(_PERSON_TRAITS)}."))
        people[name] = Person(name, year, city, job, employer, doc, born_fact, employer_fact)

    orgs: dict[str, Org] = {}
    for i, (name, kind) in enumerate(zip(org_names, org_kinds)):
        founder = people[rng.choice(person_names)]
        founded, city = founder.year + rng.randint(25, 55), rng.choice(city_names)
        founded_fact = f"{name} is a {_ORG_KINDS[kind][1]} founded in {founded} by {founder.name}."
        hq_fact = f"{name} has its headquarters in {city}."
        doc = Doc(f"org-{i:04d}", name, (
            founded_fact, hq_fact, f"It employs about {rng.randint(2, 90) * 10} people."))
        orgs[name] = Org(name, kind, founded, founder.name, city, doc, founded_fact, hq_fact)

    creators = {kind: [p for p in people.values() if p.occupation == job]
                for kind, job in (("film", "film director"), ("novel", "novelist"))}
    producers = {kind: [o for o in orgs.values() if o.kind == org_kind]
                 for kind, org_kind in (("film", "studio"), ("novel", "publisher"))}
    works: dict[str, Work] = {}
    for i, (title, kind) in enumerate(zip(work_titles, work_kinds)):
        creator, producer = rng.choice(creators[kind]), rng.choice(producers[kind])
        year = creator.year + rng.randint(25, 55)
        verb = "directed" if kind == "film" else "written"
        made_fact = f"{title} is a {year} {kind} {verb} by {creator.name}."
        producer_fact = (f"{title} was produced by {producer.name}." if kind == "film"
                         else f"{title} was published by {producer.name}.")
        doc = Doc(f"work-{i:04d}", title, (
            made_fact, f"The story follows {rng.choice(_PLOTS)}.", producer_fact))
        works[title] = Work(title, kind, year, creator.name, producer.name, doc, made_fact,
                            producer_fact)
    return KnowledgeBase(countries, cities, people, orgs, works)


# ---------------------------------------------------------------------------------------------
# Questions

@dataclass(frozen=True)
class Hop:
    """One step of a gold chain: the query to issue, the passage that answers it, the sentence."""
    query: str
    doc: Doc
    evidence: str


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    type: str                  # "attribute" | "composition" | "comparison"
    template: str
    chain: tuple[Hop, ...]

    def to_json(self, qid: str) -> dict[str, Any]:
        chain = [{"query": h.query, "doc_id": h.doc.id, "evidence": h.evidence}
                 for h in self.chain]
        return {"id": qid, "question": self.text, "golden_answers": [self.answer],
                "metadata": {"hops": len(chain), "type": self.type, "template": self.template,
                             "gold_chain": chain}}


class _Hops:
    """The single-hop lookups every question is composed of (query wording in one place)."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    def birthplace(self, person: str) -> tuple[Hop, City]:
        p = self.kb.people[person]
        return Hop(f"Where was {person} born?", p.doc, p.born_fact), self.kb.cities[p.city]

    def birth_year(self, person: str) -> tuple[Hop, int]:
        p = self.kb.people[person]
        return Hop(f"When was {person} born?", p.doc, p.born_fact), p.year

    def employer(self, person: str) -> tuple[Hop, Org]:
        p = self.kb.people[person]
        hop = Hop(f"Which organisation does {person} work for?", p.doc, p.employer_fact)
        return hop, self.kb.orgs[p.employer]

    def country(self, city: str) -> tuple[Hop, Country]:
        c = self.kb.cities[city]
        hop = Hop(f"In which country is {city}?", c.doc, c.country_fact)
        return hop, self.kb.countries[c.country]

    def founded(self, city: str) -> tuple[Hop, int]:
        c = self.kb.cities[city]
        return Hop(f"When was {city} founded?", c.doc, c.founded_fact), c.founded

    def capital(self, country: str) -> tuple[Hop, City]:
        c = self.kb.countries[country]
        hop = Hop(f"What is the capital of {country}?", c.doc, c.capital_fact)
        return hop, self.kb.cities[c.capital]

    def founder(self, org: str) -> tuple[Hop, Person]:
        o = self.kb.orgs[org]
        return Hop(f"Who founded {org}?", o.doc, o.founded_fact), self.kb.people[o.founder]

    def org_founded(self, org: str) -> tuple[Hop, int]:
        o = self.kb.orgs[org]
        return Hop(f"When was {org} founded?", o.doc, o.founded_fact), o.founded

    def headquarters(self, org: str) -> tuple[Hop, City]:
        o = self.kb.orgs[org]
        return Hop(f"Where is {org} headquartered?", o.doc, o.hq_fact), self.kb.cities[o.city]

    def creator(self, title: str) -> tuple[Hop, Person]:
        w = self.kb.works[title]
        query = f"Who directed {title}?" if w.kind == "film" else f"Who wrote {title}?"
        return Hop(query, w.doc, w.made_fact), self.kb.people[w.creator]

    def producer(self, title: str) -> tuple[Hop, Org]:
        w = self.kb.works[title]
        query = (f"Which studio produced {title}?" if w.kind == "film"
                 else f"Which publisher published {title}?")
        return Hop(query, w.doc, w.producer_fact), self.kb.orgs[w.producer]

    def release_year(self, title: str) -> tuple[Hop, int]:
        w = self.kb.works[title]
        verb = "released" if w.kind == "film" else "published"
        return Hop(f"When was {title} {verb}?", w.doc, w.made_fact), w.year


def _question(template: str, qtype: str, text: str, answer: Any, *hops: Hop) -> Question:
    return Question(text, str(answer), qtype, template, hops)


def _single_entity_questions(kb: KnowledgeBase, h: _Hops) -> Iterator[Question]:
    """Attribute (1 hop) and composition (2–3 hop) questions, one per template and entity."""
    for p in kb.people:
        (b, city), (y, year), (e, org) = h.birthplace(p), h.birth_year(p), h.employer(p)
        (c, country), (hq, hq_city) = h.country(city.name), h.headquarters(org.name)
        f, founder = h.founder(org.name)
        (hqc, hq_country), (fb, founder_city) = h.country(hq_city.name), h.birthplace(founder.name)
        yield _question("birth_city", "attribute", f"In which city was {p} born?", city.name, b)
        yield _question("birth_year", "attribute", f"In which year was {p} born?", year, y)
        yield _question("employer", "attribute", f"Which organisation does {p} work for?",
                        org.name, e)
        yield _question("birth_country", "composition",
                        f"In which country is the birthplace of {p}?", country.name, b, c)
        yield _question("employer_city", "composition",
                        f"In which city is the organisation that {p} works for headquartered?",
                        hq_city.name, e, hq)
        yield _question("employer_founder", "composition",
                        f"Who founded the organisation that {p} works for?", founder.name, e, f)
        yield _question("employer_country", "composition",
                        f"In which country is the organisation that {p} works for headquartered?",
                        hq_country.name, e, hq, hqc)
        yield _question("employer_founder_city", "composition",
                        f"Where was the founder of the organisation that {p} works for born?",
                        founder_city.name, e, f, fb)
    for name in kb.cities:
        (c, country), (f, year) = h.country(name), h.founded(name)
        yield _question("city_country", "attribute", f"In which country is {name}?",
                        country.name, c)
        yield _question("city_founded", "attribute", f"In which year was {name} founded?", year, f)
    for name in kb.countries:
        cap, city = h.capital(name)
        yield _question("capital", "attribute", f"What is the capital of {name}?", city.name, cap)
    for o in kb.orgs:
        (f, founder), (y, year), (hq, city) = h.founder(o), h.org_founded(o), h.headquarters(o)
        (fb, founder_city), (c, country) = h.birthplace(founder.name), h.country(city.name)
        (fc, founder_country) = h.country(founder_city.name)
        yield _question("founder", "attribute", f"Who founded {o}?", founder.name, f)
        yield _question("org_founded", "attribute", f"In which year was {o} founded?", year, y)
        yield _question("hq_city", "attribute", f"In which city is {o} headquartered?",
                        city.name, hq)
        yield _question("hq_country", "composition", f"In which country is {o} headquartered?",
                        country.name, hq, c)
        yield _question("founder_city", "composition", f"Where was the founder of {o} born?",
                        founder_city.name, f, fb)
        yield _question("founder_country", "composition",
                        f"In which country was the founder of {o} born?", founder_country.name,
                        f, fb, fc)
    for t, w in kb.works.items():
        (cr, creator), (pr, producer), (ry, year) = h.creator(t), h.producer(t), h.release_year(t)
        (cb, city), (cy, birth_year), (phq, hq_city) = (
            h.birthplace(creator.name), h.birth_year(creator.name), h.headquarters(producer.name))
        (cc, country), (pc, hq_country) = h.country(city.name), h.country(hq_city.name)
        role, made = w.creator_role, ("directed" if w.kind == "film" else "wrote")
        yield _question("creator", "attribute", f"Who {made} {t}?", creator.name, cr)
        yield _question("producer", "attribute", pr.query, producer.name, pr)
        yield _question("release_year", "attribute", f"In which year did {t} come out?", year, ry)
        yield _question("creator_city", "composition", f"Where was the {role} of {t} born?",
                        city.name, cr, cb)
        yield _question("creator_year", "composition", f"In which year was the {role} of {t} born?",
                        birth_year, cr, cy)
        yield _question("producer_city", "composition",
                        f"In which city is the {w.producer_role} {t} headquartered?",
                        hq_city.name, pr, phq)
        yield _question("creator_country", "composition",
                        f"In which country was the {role} of {t} born?", country.name, cr, cb, cc)
        yield _question("producer_country", "composition",
                        f"In which country is the {w.producer_role} {t} headquartered?",
                        hq_country.name, pr, phq, pc)


_COMPARISONS: dict[str, tuple[str, str, str]] = {  # template → (entity group, question, hop)
    "born_first": ("people", "Who was born first, {a} or {b}?", "birth_year"),
    "founded_first": ("orgs", "Which was founded first, {a} or {b}?", "org_founded"),
    "released_first": ("works", "Which came out first, {a} or {b}?", "release_year"),
}


def _comparison_questions(kb: KnowledgeBase, h: _Hops, rng: random.Random) -> Iterator[Question]:
    """Pairs of distinct entities with different years; the answer is the earlier one."""
    for template, (group, text, hop_name) in _COMPARISONS.items():
        names = list(getattr(kb, group))
        lookup: Callable[[str], tuple[Hop, int]] = getattr(h, hop_name)
        seen: set[frozenset[str]] = set()
        for _ in range(len(names)):
            a, b = rng.sample(names, 2)
            (ha, ya), (hb, yb) = lookup(a), lookup(b)
            if ya == yb or frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            yield _question(template, "comparison", text.format(a=a, b=b), a if ya < yb else b,
                            ha, hb)


def _round_robin(groups: list[list[Question]]) -> list[Question]:
    """Interleave groups (g0[0], g1[0], …, g0[1], …) so every prefix mixes them evenly."""
    out, depth = [], max((len(g) for g in groups), default=0)
    for i in range(depth):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def build_questions(kb: KnowledgeBase, seed: int = 0) -> dict[int, list[Question]]:
    """Every question over `kb`, by hop count, each list in its (seeded) split order.

    Within a hop count the templates take turns, so any prefix covers them evenly.
    """
    rng = random.Random(f"reasonrag-synthetic-questions:{seed}")
    h = _Hops(kb)
    by_template: dict[tuple[int, str], list[Question]] = {}
    for q in [*_single_entity_questions(kb, h), *_comparison_questions(kb, h, rng)]:
        if q.type != "comparison" and q.answer in q.text:
            continue  # e.g. a person who founded their own employer: trivially answerable
        by_template.setdefault((len(q.chain), q.template), []).append(q)
    for group in by_template.values():
        rng.shuffle(group)
    return {hops: _round_robin([g for (n, _), g in by_template.items() if n == hops])
            for hops in (1, 2, 3)}


def split_questions(pools: dict[int, list[Question]], sizes: dict[str, int]
                    ) -> dict[str, list[Question]]:
    """Deal each split its share of every hop count, in `sizes` order, from the pools' fronts.

    A split of n questions asks n // 3 per hop count (the remainder to the lowest hops). A pool
    too small for every split's ask (a small knowledge base) is shared in proportion to the
    asks, so no split is left empty. Each split's questions alternate hop counts 1, 2, 3, 1, …
    so its prefixes stay balanced too.
    """
    hop_counts, k = sorted(pools), len(pools)
    asks = {split: [n // k + (i < n % k) for i in range(k)] for split, n in sizes.items()}
    parts: dict[str, list[list[Question]]] = {split: [] for split in sizes}
    for i, hops in enumerate(hop_counts):
        pool, total = pools[hops], sum(ask[i] for ask in asks.values())
        start = 0
        for split, ask in asks.items():
            n = ask[i] if total <= len(pool) else ask[i] * len(pool) // total
            parts[split].append(pool[start:start + n])
            start += n
    return {split: _round_robin(p) for split, p in parts.items()}


def write_synthetic(out_dir: str | Path, seed: int = 0, num_entities: int = 300,
                    num_train: int = 600, num_dev: int = 100, num_test: int = 100
                    ) -> dict[str, Path]:
    """Write `corpus.jsonl` and `train/dev/test.jsonl` (FlashRAG format) under `out_dir`.

    Test and dev are dealt first, so (when the knowledge base has questions enough for every
    split, as at the default 300 entities) they do not change with `num_train`.
    Returns {"corpus", "train", "dev", "test"} → path.
    """
    return write_splits(out_dir, {"test": num_test, "dev": num_dev, "train": num_train}, seed,
                        num_entities)


def write_splits(out_dir: str | Path, sizes: dict[str, int], seed: int = 0,
                 num_entities: int = 300) -> dict[str, Path]:
    """Write `corpus.jsonl` and one `<split>.jsonl` per entry of `sizes` under `out_dir`.

    Splits are dealt in `sizes` order from disjoint ranges of the question pools (no question
    is in two splits), so a split never changes with the sizes of the splits after it. Every
    file is written atomically and the first split's last: when it exists, the set is complete.
    Returns {"corpus", *sizes} → path.
    """
    kb = build_knowledge_base(seed, num_entities)
    splits = split_questions(build_questions(kb, seed), sizes)
    out = Path(out_dir)
    paths = {name: out / f"{name}.jsonl" for name in ("corpus", *sizes)}
    write_jsonl_atomic(paths["corpus"], [{"id": d.id, "contents": d.contents} for d in kb.docs])
    for split in [*list(sizes)[1:], next(iter(sizes))]:
        write_jsonl_atomic(paths[split], [q.to_json(f"{split}-{i:04d}")
                                          for i, q in enumerate(splits[split])])
    return paths
