r"""A scale set beyond CounterFact: 50k-100k counterfactual facts made from the CounterFact records
alone (no new data), for quality-vs-number-of-facts curves.

    python bench/scale_facts.py --count 100000 --seed 0 --out /tmp/scale_100k.json
    python bench/scale_facts.py --count 50000 --seed 1 --out /tmp/scale_50k.json \
        --real ../shared/data/counterfact/counterfact-a.json

The output is a JSON array of flattened CounterFact records (what `neuraldb_kernels.editing.
read_counterfact` reads): the real records first (each with "synthetic": false), then synthetic
ones ("synthetic": true, "source": "neighbour-subject" or "fictional", "relation": its relation's
name, a string case_id "synthetic-N"). No two records share subject + prompt (the same fact id).

How the facts are made (every choice is drawn from one `random.Random(seed)`, over sorted inputs,
so a seed gives the same file on every machine):

1. Templates. A record's template is its prompt with the last occurrence of its subject replaced by
   "{}" ("The mother tongue of {} is"). A neighbourhood (locality) prompt is parsed with the
   templates: the most specific template (longest prefix + suffix) whose prefix and suffix frame a
   non-empty subject without outer spaces gives that subject.
2. Relations. CounterFact's templates are shared between relations ("{} is located in" serves
   country, continent and city facts), so templates alone do not separate them. The nodes are
   (template, answer) pairs and a record joins three of them: (template, ground_truth) with
   (template, target_new) (CounterFact draws the new target from the same relation) and with
   (locality template, locality_ground_truth) (a neighbourhood prompt asks the same relation of
   another subject with the same true answer). A relation is a connected component of these
   nodes; its pool is its answers, weighted by how often records use them; its templates for an
   answer are the templates seen with that answer. Relations with fewer than `MIN_RELATION_RECORDS`
   records (fragments of CounterFact's "named after" relation, whose answers are nearly all
   distinct) only contribute real records.
3. Subjects. "neighbour-subject": the subject of a parsed neighbourhood prompt, in that prompt's
   relation, with the neighbourhood's true answer as ground_truth. A (subject, relation) pair that
   the locality prompt of any record in the set probes is never edited (its specificity would
   measure an edited fact), nor one a real record already edits; so with both CounterFact files as
   real records no neighbour subject is left, and with `--real counterfact-a.json` the -b records
   donate theirs. "fictional": a fresh name composed of syllables (`fictional_name`), checked
   against every real subject, neighbour subject and answer; ground_truth null (unknown). Fictional
   facts are spread over relations in proportion to the relation's real records.
4. Targets and prompts. target_new is drawn from the relation's pool by weight, never the known
   true answer, and only among answers sharing at least two templates with the true answer (for a
   fictional subject: with at least two templates), so that prompt and paraphrase are two distinct
   templates seen with both the target and the true answer ("X is located in Europe" is a fact the
   data states in that wording).
5. Neighbourhood. Every synthetic fact's locality prompt is a real neighbourhood prompt of its
   relation that no record of the set edits, with its true answer.

Real records whose subject + prompt repeat an earlier record are left out (same fact id: editing
one would overwrite the other's database row); the summary counts them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import random
import sys
import time
from collections.abc import Mapping, Sequence

from neuraldb_kernels._files import write_text_atomically

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
SOURCES = (DATA / "counterfact-a.json", DATA / "counterfact-b.json")
SLOT = "{}"
MIN_RELATION_RECORDS = 30
NEIGHBOUR, FICTIONAL = "neighbour-subject", "fictional"
FLAT_FIELDS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
               "locality_prompt", "locality_ground_truth")
# syllables of the fictional names: consonant-vowel pairs with a few closing consonants
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th")


def template_of(prompt: str, subject: str) -> str:
    """The prompt with the last occurrence of `subject` replaced by "{}"; ValueError if absent."""
    start = prompt.rfind(subject)
    if not subject or start < 0:
        raise ValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt[:start] + SLOT + prompt[start + len(subject):]


def fill(template: str, subject: str) -> str:
    """The template with its "{}" replaced by `subject`."""
    return template.replace(SLOT, subject, 1)


class TemplateParser:
    """Finds the subject of a filled prompt from a set of templates (the most specific match)."""

    def __init__(self, templates):
        # longest frame first; ties in template order, so the parse does not depend on input order
        self._frames = sorted(((t.split(SLOT)[0], t.split(SLOT)[1], t) for t in set(templates)),
                              key=lambda f: (-(len(f[0]) + len(f[1])), f[2]))

    def parse(self, prompt: str) -> tuple[str, str] | None:
        """(template, subject) of the most specific template framing `prompt`, or None."""
        for prefix, suffix, template in self._frames:
            if (len(prompt) > len(prefix) + len(suffix) and prompt.startswith(prefix)
                    and prompt.endswith(suffix)):
                subject = prompt[len(prefix):len(prompt) - len(suffix)]
                if subject == subject.strip():
                    return template, subject
        return None


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation found in the records (module docstring, step 2).

    name: "rNN <its most used template that no other relation's records use>" (or its most used
        template when it has none of its own; NN: rank by record count).
    records: how many real records state it.
    answer_weights: answer -> how often records use it (ground_truth and target_new).
    answer_templates: answer -> sorted templates seen with it.
    """

    name: str
    records: int
    answer_weights: Mapping[str, int]
    answer_templates: Mapping[str, tuple[str, ...]]

    @property
    def templates(self) -> frozenset[str]:
        return frozenset(t for ts in self.answer_templates.values() for t in ts)

    def shared_templates(self, answer: str, true_answer: str | None) -> tuple[str, ...]:
        """Templates seen with `answer` and with `true_answer` (all of answer's when None)."""
        own = self.answer_templates.get(answer, ())
        if true_answer is None:
            return own
        other = set(self.answer_templates.get(true_answer, ()))
        return tuple(t for t in own if t in other)


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """A real fact read from a neighbourhood prompt: `subject` in `relation` has `answer`."""

    prompt: str
    subject: str
    relation: str
    answer: str


class RelationIndex:
    """Relations, the template parser and the parsed neighbourhood facts of a set of records."""

    def __init__(self, records: Sequence[Mapping]):
        templates = [template_of(r["prompt"], r["subject"]) for r in records]
        self.parser = TemplateParser(templates)
        self._parent: dict[tuple[str, str], tuple[str, str]] = {}
        parsed = []
        for record, template in zip(records, templates):
            node = (template, record["ground_truth"])
            self._join(node, (template, record["target_new"]))
            local = self.parser.parse(record["locality_prompt"])
            parsed.append(local)
            if local is not None:
                self._join(node, (local[0], record["locality_ground_truth"]))
        nodes = collections.defaultdict(list)
        for node in sorted(self._parent):
            nodes[self._root(node)].append(node)
        members = collections.defaultdict(list)
        for record, template in zip(records, templates):
            members[self._root((template, record["ground_truth"]))].append(template)
        # components by size, ties by their smallest node, so names do not depend on input order
        components = sorted(members, key=lambda c: (-len(members[c]), nodes[c][0]))
        # a relation is named by its most used template that no other relation's records use
        users = collections.defaultdict(set)
        for component in components:
            for template in members[component]:
                users[template].add(component)
        self.relations: dict[str, Relation] = {}
        self._relation_of_root: dict[tuple[str, str], str] = {}
        for rank, component in enumerate(components):
            if len(members[component]) < MIN_RELATION_RECORDS:
                continue
            weights = collections.Counter()
            for record, template in zip(records, templates):
                if self._root((template, record["ground_truth"])) == component:
                    weights[record["ground_truth"]] += 1
                    weights[record["target_new"]] += 1
            seen = collections.defaultdict(list)
            for template, answer in nodes[component]:
                seen[answer].append(template)
            ranked = [t for t, _ in collections.Counter(members[component]).most_common()]
            top = next((t for t in ranked if users[t] == {component}), ranked[0])
            name = f"r{rank:02d} {top}"
            self.relations[name] = Relation(name, len(members[component]), dict(sorted(weights.items())),
                                            {a: tuple(sorted(ts)) for a, ts in sorted(seen.items())})
            self._relation_of_root[component] = name
        self.neighbours: list[Neighbour] = []
        for record, local in zip(records, parsed):
            relation = self.relation_of(local[0], record["locality_ground_truth"]) if local else None
            if relation is not None:
                self.neighbours.append(Neighbour(record["locality_prompt"], local[1], relation,
                                                 record["locality_ground_truth"]))

    def _root(self, node):
        parent = self._parent
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def _join(self, a, b):
        self._parent[self._root(a)] = self._root(b)

    def relation_of(self, template: str, answer: str) -> str | None:
        """The name of the relation of (template, answer), or None (unseen or a small fragment)."""
        node = (template, answer)
        return self._relation_of_root.get(self._root(node)) if node in self._parent else None


def fictional_name(rng: random.Random) -> str:
    """A made-up two-word name ("Kraveth Doumira"): each word 2-3 syllables of consonant + vowel
    (+ an optional closing consonant on the last), capitalised."""
    def word():
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3))]
        return ("".join(syllables) + rng.choice(_CODAS)).capitalize()
    return f"{word()} {word()}"


@dataclasses.dataclass(frozen=True)
class ScaleSet:
    """A generated set: `records` (real first, then synthetic) and its distribution.

    per_relation: relation name -> {"real": n, "neighbour-subject": n, "fictional": n, "targets": n
    distinct target_new among its synthetic facts}. per_source: "real" / source -> n.
    dropped_real_duplicates: real records left out (subject + prompt repeated). seconds: wall time.
    """

    records: list[dict]
    per_relation: dict[str, dict[str, int]]
    per_source: dict[str, int]
    dropped_real_duplicates: int
    relations: dict[str, Relation]
    seconds: float

    def summary(self) -> dict:
        return {"records": len(self.records), "per_source": self.per_source,
                "dropped_real_duplicates": self.dropped_real_duplicates, "relations": len(self.per_relation),
                "per_relation": self.per_relation, "seconds": round(self.seconds, 2)}


def _draw_target(rng: random.Random, relation: Relation, true_answer: str | None):
    """(target, templates) for a fact whose true answer is `true_answer` (None: unknown), or None
    when no answer of the pool shares two templates with it."""
    candidates = [(a, w) for a, w in relation.answer_weights.items()
                  if a != true_answer and len(relation.shared_templates(a, true_answer)) >= 2]
    if not candidates:
        return None
    answers, weights = zip(*candidates)
    target = rng.choices(answers, weights=weights)[0]
    return target, relation.shared_templates(target, true_answer)


def _quotas(total: int, shares: Mapping[str, int]) -> dict[str, int]:
    """`total` split over the keys in proportion to `shares` (largest remainder; ties by key)."""
    whole = sum(shares.values())
    exact = {k: total * v / whole for k, v in shares.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: (-(exact[k] - quota[k]), k))[: total - sum(quota.values())]:
        quota[k] += 1
    return quota


def generate(source: Sequence[Mapping], real: Sequence[Mapping], count: int, seed: int = 0) -> ScaleSet:
    """`count` records: `real` (minus repeated subject + prompt) then synthetic facts made from the
    relations and neighbourhood prompts of `source` (module docstring). ValueError when `count`
    is smaller than the real records kept or the relations cannot supply enough facts."""
    started = time.perf_counter()
    rng = random.Random(seed)
    index = RelationIndex(source)
    relations = index.relations

    records, keys, dropped = [], set(), 0
    for record in real:
        key = (record["subject"], record["prompt"])
        if key in keys:
            dropped += 1
            continue
        keys.add(key)
        records.append({**{f: record.get(f) for f in FLAT_FIELDS}, "synthetic": False})
    if count < len(records):
        raise ValueError(f"--count {count} is smaller than the {len(records)} real records; pass fewer --real files")

    def relation_of_record(record):
        return index.relation_of(template_of(record["prompt"], record["subject"]), record["ground_truth"])

    edited = {(r["subject"], relation_of_record(r)) for r in records}
    probed = set()
    for record in records:
        local = index.parser.parse(record["locality_prompt"])
        if local is not None:
            probed.add((local[1], index.relation_of(local[0], record["locality_ground_truth"])))
    # unedited real neighbourhood facts per relation, for the synthetic facts' locality prompts
    locality_pool = collections.defaultdict(dict)
    for n in index.neighbours:
        if (n.subject, n.relation) in probed and (n.subject, n.relation) not in edited:
            locality_pool[n.relation].setdefault(n.prompt, n.answer)
    usable = sorted(r for r in relations if locality_pool[r])
    locality_lists = {r: sorted(locality_pool[r].items()) for r in usable}

    real_subjects = {r["subject"].casefold() for r in source} | {r["subject"].casefold() for r in records}
    taken_names = real_subjects | {n.subject.casefold() for n in index.neighbours}
    taken_names |= {a.casefold() for rel in relations.values() for a in rel.answer_weights}

    budget = count - len(records)
    if budget and not usable:
        raise ValueError(f"no relation of the source records has {MIN_RELATION_RECORDS} records and an "
                         f"unedited neighbourhood prompt to make synthetic facts from")
    synthetic = []

    def add(relation_name, subject, true_answer, source_kind):
        relation = relations[relation_name]
        drawn = _draw_target(rng, relation, true_answer)
        if drawn is None:
            return False
        target, templates = drawn
        prompt_template, paraphrase_template = rng.sample(templates, 2)
        prompt = fill(prompt_template, subject)
        if (subject, prompt) in keys:
            return False
        locality_prompt, locality_answer = rng.choice(locality_lists[relation_name])
        keys.add((subject, prompt))
        edited.add((subject, relation_name))
        synthetic.append({"case_id": f"synthetic-{len(synthetic)}", "prompt": prompt, "subject": subject,
                          "target_new": target, "ground_truth": true_answer,
                          "rephrase_prompt": fill(paraphrase_template, subject),
                          "locality_prompt": locality_prompt, "locality_ground_truth": locality_answer,
                          "synthetic": True, "source": source_kind, "relation": relation_name})
        return True

    # neighbour subjects: one fact per unprobed, unedited (subject, relation), in a seeded order
    candidates = sorted({(n.subject, n.relation, n.answer) for n in index.neighbours
                         if n.relation in locality_lists and (n.subject, n.relation) not in probed
                         and (n.subject, n.relation) not in edited})
    rng.shuffle(candidates)
    for subject, relation_name, answer in candidates:
        if len(synthetic) >= budget:
            break
        if (subject, relation_name) not in edited:
            add(relation_name, subject, answer, NEIGHBOUR)

    quotas = _quotas(budget - len(synthetic), {r: relations[r].records for r in usable})
    for relation_name in usable:
        made = 0
        while made < quotas[relation_name]:
            name = fictional_name(rng)
            if name.casefold() in taken_names:
                continue
            taken_names.add(name.casefold())
            if not add(relation_name, name, None, FICTIONAL):
                raise ValueError(f"relation {relation_name!r} has no answer with two templates")
            made += 1

    records.extend(synthetic)
    per_relation = {name: {"real": 0, NEIGHBOUR: 0, FICTIONAL: 0, "targets": 0} for name in relations}
    targets = collections.defaultdict(set)
    for record in records[: len(records) - len(synthetic)]:
        name = relation_of_record(record)
        if name is not None:
            per_relation[name]["real"] += 1
    for record in synthetic:
        per_relation[record["relation"]][record["source"]] += 1
        targets[record["relation"]].add(record["target_new"])
    for name, answers in targets.items():
        per_relation[name]["targets"] = len(answers)
    per_source = {"real": len(records) - len(synthetic),
                  **collections.Counter(r["source"] for r in synthetic)}
    return ScaleSet(records, per_relation, per_source, dropped, relations, time.perf_counter() - started)


def read_records(paths) -> list[dict]:
    """The flattened CounterFact records of the JSON arrays at `paths`, in order."""
    records = []
    for path in paths:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of flattened CounterFact records")
        for position, record in enumerate(data):
            missing = [f for f in FLAT_FIELDS[1:]
                       if not isinstance(record, Mapping) or not isinstance(record.get(f), str)]
            if missing:
                raise ValueError(f"{path}: record {position} has no string {', '.join(missing)}: "
                                 f"not flattened CounterFact")
        records.extend(data)
    return records


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, required=True, help="records in the output, real ones included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--real", nargs="+", default=[str(p) for p in SOURCES],
                        help="flattened CounterFact files whose records lead the set (default: -a and -b)")
    parser.add_argument("--source", nargs="+", default=[str(p) for p in SOURCES],
                        help="files the relations and neighbour subjects are read from (default: -a and -b)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be positive, got {args.count}")
    try:
        result = generate(read_records(args.source), read_records(args.real), args.count, args.seed)
    except (OSError, ValueError) as error:
        parser.exit(2, f"scale_facts: {error}\n")
    write_text_atomically(args.out, json.dumps(result.records, ensure_ascii=False))
    summary = result.summary()
    json.dump(summary, sys.stdout, indent=1)
    print()
    return summary


if __name__ == "__main__":
    main()
