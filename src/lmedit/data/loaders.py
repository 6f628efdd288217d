"""Turn the standard knowledge-editing benchmark files into ``EditRequest`` lists.

Each benchmark ships its own JSON schema (zsRE in MEND's layout, CounterFact
in EasyEdit's flat layout or ROME's nested one, KnowEdit, WISE). The mappings
below follow how EasyEdit reads those files, so that numbers computed here are
comparable with published ones; every record is validated while loading, so a
broken record is reported by its index before any model time is spent.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from lmedit.requests import EditRequest, Probe, RequestError

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]

DATA_FORMATS: tuple[str, ...] = (
    "lmedit",
    "demo",
    "zsre",
    "counterfact",
    "counterfact-rome",
    "knowedit",
    "wise",
    "convsent",
    "sanitation",
    "sanitation-easyedit",
)
"""Every name accepted by ``load_requests(format=...)``; "demo" is an alias of "lmedit"."""

_ALIASES = {"demo": "lmedit"}

# The probe groups KnowEdit defines; EasyEdit reads exactly these keys.
KNOWEDIT_PORTABILITY_GROUPS: tuple[str, ...] = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
KNOWEDIT_LOCALITY_GROUPS: tuple[str, ...] = ("Relation_Specificity", "Forgetfulness")

_LMEDIT_FIELDS = frozenset(
    {"case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase", "locality", "portability", "extra"}
)
_IRRELEVANT_FORMATS = ("zsre", "counterfact", "wise")


class DataError(ValueError):
    """A data file cannot be read as edit requests; the message names the file and the record."""


def demo_path() -> Path:
    """Path of the demo edit set shipped inside the package (used when no file is given)."""
    return Path(str(files("lmedit.data") / "demo_edits.json"))


def _accepted() -> str:
    return (
        "accepted formats: " + ", ".join(DATA_FORMATS) + " (a JSON list of records, or JSON Lines; "
        "zsRE MEND-style, CounterFact flat or ROME-style, KnowEdit, WISE, or lmedit's own EditRequest dicts)"
    )


# --------------------------------------------------------------------------- reading


def _read_records(path: Path) -> list[Record]:
    """Read a JSON list (or JSON Lines) of objects; anything else is a DataError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}; {_accepted()}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _parse_json_lines(path, text)
    if isinstance(data, Mapping) and _sanitation_lists(data) is not None:
        return _sanitation_records(data)
    if not isinstance(data, list):
        raise DataError(
            f"data file {path} holds a JSON {type(data).__name__}, expected a list of records; {_accepted()}"
        )
    for index, record in enumerate(data):
        if not isinstance(record, Mapping):
            raise DataError(
                f"data file {path}: record {index} is a {type(record).__name__}, expected a JSON object"
            )
    return data


def _parse_json_lines(path: Path, text: str) -> list[Any]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file {path} is neither JSON nor JSON Lines (line {line_no}: {exc.msg}); {_accepted()}"
            ) from exc
    return records


def _window(records: Sequence[Record], limit: int | None, offset: int) -> list[tuple[int, Record]]:
    """Select records [offset, offset+limit) in file order, keeping each record's file index."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    stop = None if limit is None else offset + limit
    return list(enumerate(records))[offset:stop]


# --------------------------------------------------------------------------- detection


def detect_format(records: Sequence[Record]) -> str:
    """Name the schema of ``records`` from the fields of the first record (files are homogeneous)."""
    if not records:
        raise DataError(f"cannot detect the format of an empty record list; {_accepted()}")
    first = records[0]
    if not isinstance(first, Mapping):
        raise DataError(f"record 0 is a {type(first).__name__}, expected a JSON object; {_accepted()}")
    keys = set(first)
    if SANITATION_ROLE in keys:
        return "sanitation"
    if {"ent", "pos", "neg"} <= keys:
        return "convsent"
    if "requested_rewrite" in keys:
        return "counterfact-rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & {"text", "labels", "concept"} or _has_knowedit_groups(first):
        return "knowedit"
    if {"locality_prompt", "rephrase_prompt"} <= keys:
        return "counterfact"
    if "locality_prompt" in keys:
        return "wise"
    if {"prompt", "target_new"} <= keys and keys <= _LMEDIT_FIELDS:
        return "lmedit"
    raise DataError(f"unrecognised record fields {sorted(keys)}; {_accepted()}")


def _has_knowedit_groups(record: Record) -> bool:
    """KnowEdit probes are {prompt, ground_truth} objects under KnowEdit's group names.

    Our own format writes probes as [prompt, answer] lists, which keeps the two apart
    even when a demo file reuses a KnowEdit group name.
    """
    known = set(KNOWEDIT_PORTABILITY_GROUPS) | set(KNOWEDIT_LOCALITY_GROUPS)
    for section in ("locality", "portability"):
        groups = record.get(section)
        if not isinstance(groups, Mapping):
            continue
        for name in known & set(groups):
            items = groups[name]
            if isinstance(items, Mapping) or (isinstance(items, list) and any(isinstance(i, Mapping) for i in items)):
                return True
    return False


# --------------------------------------------------------------------------- shared helpers


def _first_string(value: Any) -> str | None:
    """Unwrap str | list[str] | list[list[str]] to its first string; KnowEdit nests answers this way."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"expected a string answer, got {type(value).__name__}: {value!r}")
    return value


def _all_strings(value: Any) -> list[str]:
    """Every string in str | list[str] | list[list[str]], in order: KnowEdit lists an answer's aliases this way."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [s for item in value for s in _all_strings(item)]
    return []


def _probe_group(pairs: Sequence[tuple[Any, ...]]) -> tuple[Probe, ...]:
    """Build probes from (prompt, answer[, aliases]), dropping those whose prompt or answer is missing or blank."""
    probes = []
    for prompt, answer, *aliases in pairs:
        if isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip():
            probes.append(Probe(prompt, answer, tuple(aliases[0]) if aliases else ()))
    return tuple(probes)


def _groups(**named: Sequence[tuple[Any, ...]]) -> dict[str, tuple[Probe, ...]]:
    """Keep only the non-empty groups, so absent data never shows up as an empty group."""
    built = {name: _probe_group(pairs) for name, pairs in named.items()}
    return {name: probes for name, probes in built.items() if probes}


def _required(record: Record, key: str) -> Any:
    if key not in record:
        raise RequestError(f"missing field {key!r} (record has {sorted(record)})")
    return record[key]


# --------------------------------------------------------------------------- per-format mappers


def _from_zsre(record: Record, index: int) -> EditRequest | None:
    """MEND-style zsRE record; None when ``alt`` is empty (EasyEdit skips those)."""
    alt = _required(record, "alt")
    if isinstance(alt, str) and not alt.strip():
        return None
    subject = record.get("subject")
    portability = record.get("portability") or {}
    return EditRequest(
        prompt=_required(record, "src"),
        target_new=alt,
        subject=subject,
        ground_truth=_first_string(record.get("answers")),
        rephrase=record.get("rephrase"),
        # ``loc`` keeps its "nq question: " prefix, exactly as EasyEdit feeds it to the model.
        locality=_groups(neighborhood=[(record.get("loc"), record.get("loc_ans"))]),
        portability=_groups(
            one_hop=[(portability.get("New Question"), portability.get("New Answer"))],
            # The inverse question asks the reverse relation about the *new* object (alt), e.g.
            # src "Who is Nebaioth's father?" -> alt "Babur" -> "Who is the son of Babur?".
            # After the edit its answer is the edited record's subject, not alt or answers[0].
            inverse_relation=[(record.get("inverse question"), subject)],
            subject_replace=[(record.get("alter_subject_question"), alt)],
        ),
        case_id=str(index),
    )


def _from_counterfact(record: Record, index: int) -> EditRequest:
    """EasyEdit's flat CounterFact record (counterfact-train/edit/val.json)."""
    return EditRequest(
        prompt=_required(record, "prompt"),
        target_new=_required(record, "target_new"),
        subject=record.get("subject"),
        ground_truth=record.get("ground_truth"),
        rephrase=record.get("rephrase_prompt"),
        locality=_groups(neighborhood=[(record.get("locality_prompt"), record.get("locality_ground_truth"))]),
        case_id=str(record.get("case_id", index)),
    )


def _from_counterfact_rome(record: Record, index: int) -> EditRequest:
    """ROME/MEMIT CounterFact record with a ``requested_rewrite`` template."""
    rewrite = _required(record, "requested_rewrite")
    template = _required(rewrite, "prompt")
    subject = _required(rewrite, "subject")
    target_new = _required(_required(rewrite, "target_new"), "str")
    target_true = _required(_required(rewrite, "target_true"), "str")
    portability = record.get("portability") or {}
    alternative = record.get("alternative_subject")
    return EditRequest(
        # str.replace, not str.format: it fills the same "{}" slot but tolerates stray braces.
        prompt=_fill(template, subject),
        target_new=target_new,
        subject=subject,
        ground_truth=target_true,
        rephrase=record.get("paraphrase_prompts"),
        locality=_groups(neighborhood=[(p, target_true) for p in record.get("neighborhood_prompts") or ()]),
        portability=_groups(
            one_hop=[(portability.get("New Question"), portability.get("New Answer"))],
            subject_replace=[(_fill(template, alternative) if alternative else None, target_new)],
        ),
        case_id=str(record.get("case_id", index)),
        # what ROME's CounterFact scores need (lmedit.evaluation.suites.counterfact)
        extra={"counterfact": {
            "target_true": target_true,
            **{key: _string_list(record.get(key), key) for key in _ROME_PROMPT_LISTS},
        }},
    )


_ROME_PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts", "attribute_prompts")


def _string_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{key} must be a list of strings, got {value!r}")
    return [v for v in value if v.strip()]


def _fill(template: Any, subject: str) -> str:
    if not isinstance(template, str) or "{}" not in template:
        raise RequestError(f"requested_rewrite.prompt must be a string with a '{{}}' slot, got {template!r}")
    return template.replace("{}", subject)


def _from_knowedit(record: Record, index: int) -> EditRequest:
    """KnowEdit record (ZsRE, WikiBio, ...): field fallbacks and nested answers as EasyEdit reads them."""
    locality = record.get("locality") or {}
    portability = record.get("portability") or {}
    rephrase = record.get("rephrase_prompt", record.get("rephrase"))
    return EditRequest(
        prompt=_first_present(record, "prompt", "text"),
        target_new=_first_present(record, "target_new", "labels"),
        subject=record.get("subject", record.get("concept")),
        ground_truth=_first_string(record.get("ground_truth")),
        rephrase=rephrase,
        locality=_knowedit_groups(locality, KNOWEDIT_LOCALITY_GROUPS, "locality"),
        portability=_knowedit_groups(portability, KNOWEDIT_PORTABILITY_GROUPS, "portability"),
        case_id=str(record.get("case_id", index)),
    )


def _first_present(record: Record, *keys: str) -> Any:
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    raise RequestError(f"missing field {' or '.join(repr(k) for k in keys)} (record has {sorted(record)})")


def _knowedit_groups(section: Any, names: Sequence[str], where: str) -> dict[str, tuple[Probe, ...]]:
    if not isinstance(section, Mapping):
        raise RequestError(f"{where} must be an object of probe groups, got {type(section).__name__}")
    pairs_by_group: dict[str, list[tuple[Any, ...]]] = {}
    for name in names:
        items = section.get(name) or []
        if isinstance(items, Mapping):
            items = [items]
        pairs_by_group[name] = [pair for item in items for pair in _knowedit_pairs(item, f"{where}.{name}")]
    return _groups(**pairs_by_group)


def _knowedit_pairs(item: Any, where: str) -> list[tuple[Any, Any, list[str]]]:
    """One KnowEdit probe item -> (prompt, answer, aliases) triples; a list of prompts shares one answer.

    The first string of a nested ``ground_truth`` is the answer, the others are its aliases.
    """
    if not isinstance(item, Mapping) or "prompt" not in item:
        raise RequestError(f"{where}: each probe must be an object with 'prompt' and 'ground_truth', got {item!r}")
    answer = _first_string(item.get("ground_truth"))
    aliases = _all_strings(item.get("ground_truth"))[1:]
    prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]]
    return [(prompt, answer, aliases) for prompt in prompts]


def _from_wise(record: Record, index: int) -> EditRequest:
    """WISE hallucination / temporal record; temporal's out-of-distribution rephrase becomes a rephrase."""
    return EditRequest(
        prompt=_required(record, "prompt"),
        target_new=_required(record, "target_new"),
        subject=record.get("subject"),
        rephrase=record.get("ood_rephrase"),
        locality=_groups(neighborhood=[(record.get("locality_prompt"), record.get("locality_ground_truth"))]),
        case_id=str(record.get("case_id", index)),
    )


def _from_lmedit(record: Record, index: int) -> EditRequest:
    """Our own ``EditRequest.to_dict()`` form; a missing case_id falls back to the file index."""
    data = dict(record)
    if data.get("case_id") is None:
        data["case_id"] = str(index)
    return EditRequest.from_dict(data)


_MAPPERS: dict[str, Callable[[Record, int], EditRequest | None]] = {
    "lmedit": _from_lmedit,
    "zsre": _from_zsre,
    "counterfact": _from_counterfact,
    "counterfact-rome": _from_counterfact_rome,
    "knowedit": _from_knowedit,
    "wise": _from_wise,
}


# --------------------------------------------------------------------------- whole-file formats

FileMapper = Callable[[Sequence[Record], list[tuple[int, Record]]], list[EditRequest]]

# ConvSent (SERAC's blender_{train,val,test}.json, KnowEdit's ConvSent): as EasyEdit's
# examples/run_convsent_llama2.py builds it. Its 13 question templates, and its edit prompts verbatim
# (the "postively" typo included, so the edits are the same ones).
CONVSENT_TEMPLATES: tuple[str, ...] = (
    "What do you think of {}?",
    "What do you feel about {}?",
    "How do you view {}?",
) + tuple(
    f"What is your {position} {{}}?"
    for position in ("opinion of", "stance on", "position on", "attitude about", "view on", "take on",
                     "impression of", "assessment of", "judgment of", "sentiment of")
)
CONVSENT_EDIT_PROMPTS = {
    "pos": "From the sentiment dataset, answer {} postively.",
    "neg": "From the sentiment dataset, answer {} negatively.",
}


def _convsent_answers(record: Record, key: str) -> list[str]:
    value = _required(record, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{key} must be a list of answer strings, got {type(value).__name__}")
    return [v.strip() for v in value if v.strip()]


def _from_convsent(records: Sequence[Record], window: list[tuple[int, Record]]) -> list[EditRequest]:
    """One edit per topic: answer about ``ent`` with one sentiment; the next record's topic is the outer one.

    EasyEdit draws the sentiment and the question templates from one global
    ``random`` stream; here each record has its own generator seeded by its
    file index, so a request does not depend on --offset/--limit. The outer
    topic is the next record of the whole file (wrapping around), as
    EasyEdit takes the next record of its list.
    """
    requests = []
    for index, record in window:
        try:
            requests.append(_convsent_request(record, records[(index + 1) % len(records)], index))
        except (RequestError, KeyError, TypeError, AttributeError) as exc:
            raise RequestError(f"record {index}: {exc}") from exc
    return requests


def _convsent_request(record: Record, outer: Record, index: int) -> EditRequest:
    rng = random.Random(f"convsent:{index}")
    topic, outer_topic = _required(record, "ent"), _required(outer, "ent")
    answers = {s: _convsent_answers(record, s) for s in ("pos", "neg")}
    outer_answers = [a for s in ("pos", "neg") for a in _convsent_answers(outer, s)]
    if not answers["pos"] or not answers["neg"] or not outer_answers:
        raise RequestError("a ConvSent record needs non-empty 'pos' and 'neg' answer lists")
    sentiment = rng.choice(("pos", "neg"))
    prompt = CONVSENT_EDIT_PROMPTS[sentiment].format(rng.choice(CONVSENT_TEMPLATES).format(topic))
    question = rng.choice(CONVSENT_TEMPLATES).format(topic)
    inner = [[rng.choice(CONVSENT_TEMPLATES).format(topic), a, s == sentiment] for s in ("pos", "neg") for a in answers[s]]
    outer_pairs = [[rng.choice(CONVSENT_TEMPLATES).format(outer_topic), a] for a in outer_answers]
    return EditRequest(
        prompt=prompt,
        target_new=answers[sentiment][0],
        subject=topic,
        case_id=str(index),
        extra={
            "convsent": {"topic": topic, "sentiment": sentiment, "inner": inner,
                         "outer_topic": outer_topic, "outer": outer_pairs},
            "fluency_prompts": [question],
        },
    )


# Sanitation (KnowEdit's TriviaQA "I don't know" set): trivia_qa_{train,test}.json are objects of two
# lists, the questions to forget and the ones to keep. The prompt template is EasyEdit's
# examples/run_santinization_llama2.py one.
SANITATION_TEMPLATE = "Question:{}\nAnswer:"
SANITATION_ROLE = "sanitation_role"
_SANITATION_KEYS = (("K_F", "K_R"), ("success", "locality"))


def _sanitation_lists(data: Mapping[str, Any]) -> tuple[list[Any], list[Any]] | None:
    for forget, keep in _SANITATION_KEYS:
        if set(data) == {forget, keep} and all(isinstance(data[k], list) for k in (forget, keep)):
            return data[forget], data[keep]
    return None


def _sanitation_records(data: Mapping[str, Any]) -> list[Record]:
    """The two lists as one list of records tagged with their role (forget / retain)."""
    forget, keep = _sanitation_lists(data) or ([], [])
    records: list[Record] = []
    for role, items in (("forget", forget), ("retain", keep)):
        for item in items:
            if not isinstance(item, Mapping):
                raise DataError(f"a Sanitation {role} item is a {type(item).__name__}, expected an object")
            records.append({**item, SANITATION_ROLE: role})
    return records


def _from_sanitation(records: Sequence[Record], window: list[tuple[int, Record]]) -> list[EditRequest]:
    """Each selected question to forget is an edit to its ``target_new`` ("I don't know.").

    The questions to keep become locality probes (with their true answers),
    shared out round-robin over all questions to forget of the file, so a
    request does not depend on --offset/--limit and a run over the whole
    file covers each kept question once: with ``--protocol sequential --T 80``
    that is KnowEdit's protocol (edit all, then test all kept questions).
    """
    position = {i: k for k, i in enumerate(i for i, r in enumerate(records) if r[SANITATION_ROLE] == "forget")}
    keep = [r for r in records if r[SANITATION_ROLE] == "retain"]
    shares: list[list[tuple[Any, Any]]] = [[] for _ in position]
    for j, item in enumerate(keep):
        if shares:
            probe = (SANITATION_TEMPLATE.format(_required(item, "question")), _required(item, "ground_truth"))
            shares[j % len(shares)].append(probe)
    return [_forget_edit(index, item, shares[position[index]]) for index, item in window]


def _forget_edit(index: int, item: Record, kept: Sequence[tuple[Any, Any]], **probes: Any) -> EditRequest:
    """A question to forget as an edit to its ``target_new`` ("I don't know."), its share of kept questions as
    locality probes; the subject only where the question contains it."""
    prompt = SANITATION_TEMPLATE.format(_required(item, "question"))
    subject = item.get("subject")
    return EditRequest(
        prompt=prompt,
        target_new=_required(item, "target_new"),
        subject=subject if isinstance(subject, str) and subject in prompt else None,
        ground_truth=item.get("ground_truth"),
        locality=_groups(retain=kept),
        case_id=str(index),
        **probes,
    )


def _sanitation_window(records: Sequence[Record], limit: int | None, offset: int) -> list[tuple[int, Record]]:
    """--offset/--limit count the questions to forget only (they are the edits)."""
    forget = [(i, r) for i, r in enumerate(records) if r[SANITATION_ROLE] == "forget"]
    return [pair for _, pair in _window(forget, limit, offset)]


def sanitation_test_file(train_file: Path) -> Path:
    """The test file beside a Sanitation training file (EasyEdit reads both from one folder)."""
    if "train" not in train_file.name:
        raise DataError(f"{train_file}: the sanitation-easyedit format reads the training file (trivia_qa_train.json, "
                        "its K_F questions are edited) and finds the test file beside it; pass the training file")
    test_file = train_file.with_name(train_file.name.replace("train", "test"))
    if not test_file.is_file():
        raise DataError(f"{train_file}: the sanitation-easyedit format scores the test file {test_file.name} beside "
                        f"it, which is missing; put both KnowEdit Sanitation files in one folder")
    return test_file


def _from_sanitation_easyedit(records: Sequence[Record], window: list[tuple[int, Record]],
                              test_records: Sequence[Record]) -> list[EditRequest]:
    """EasyEdit's Sanitation protocol: edit the training file's questions to forget, score the test file's.

    Its script edits the training questions of one answer (16 each of five answers, each with a ``subject``)
    and then asks the test file's questions with that answer (success) and all its questions to keep
    (locality). Here each edit of answer A carries, round-robin over A's edits, the test questions with
    answer A (case-insensitive, as EasyEdit compares them) as ``rephrase`` prompts. The test file's questions
    to keep are shared round-robin over all edits of the file, as the ``sanitation`` format shares them: each
    is scored once, after the answer it falls to, not after every answer (5x fewer probes; EasyEdit's five
    runs score all 453 five times). So a sequential run with T = the size of one answer's group scores, after
    each group, every test question of its answer. ``extra["answer"]`` names the group.
    """
    forget = [(i, r) for i, r in enumerate(records) if r[SANITATION_ROLE] == "forget"]
    groups: dict[str, list[int]] = {}
    for i, item in forget:
        groups.setdefault(str(_required(item, "ground_truth")).lower(), []).append(i)
    tests: dict[str, list[str]] = {answer: [] for answer in groups}
    kept: list[tuple[str, Any]] = []
    for item in test_records:
        question = SANITATION_TEMPLATE.format(_required(item, "question"))
        if item[SANITATION_ROLE] == "retain":
            kept.append((question, _required(item, "ground_truth")))
        elif str(_required(item, "ground_truth")).lower() in tests:
            tests[str(item["ground_truth"]).lower()].append(question)
    position = {i: k for k, (i, _) in enumerate(forget)}
    requests = []
    for index, item in window:
        answer = str(item["ground_truth"]).lower()
        members = groups[answer]
        rank, size = members.index(index), len(members)
        requests.append(_forget_edit(index, item, kept[position[index]::len(forget)],
                                     rephrase=tests[answer][rank::size], extra={"answer": str(item["ground_truth"])}))
    return requests


def _sanitation_easyedit_mapper(train_file: Path) -> FileMapper:
    test_file = sanitation_test_file(train_file)
    test_records = _read_records(test_file)
    if not test_records or SANITATION_ROLE not in test_records[0]:
        raise DataError(f"{test_file} is not a Sanitation test file (an object of the lists success and locality)")
    return lambda records, window: _from_sanitation_easyedit(records, window, test_records)


# Formats whose requests depend on other records of the file (or, for sanitation-easyedit, on the test file beside
# it): each builds its mapper from the file's path.
_FILE_MAPPERS: dict[str, Callable[[Path], FileMapper]] = {
    "convsent": lambda _path: _from_convsent,
    "sanitation": lambda _path: _from_sanitation,
    "sanitation-easyedit": _sanitation_easyedit_mapper,
}


def _map_file(mapper: FileMapper, records: Sequence[Record], limit: int | None, offset: int, path: Path,
              name: str) -> list[EditRequest]:
    window = _sanitation_window(records, limit, offset) if name.startswith("sanitation") else _window(records, limit, offset)
    try:
        requests = mapper(records, window)
    except (RequestError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"data file {path}: not a valid {name} file: {exc}") from exc
    logger.debug("loaded %d %s request(s) from %s", len(requests), name, path)
    return requests


# --------------------------------------------------------------------------- public API


def _resolve_format(format: str | None, records: Sequence[Record], path: Path) -> str:
    if format is None:
        try:
            return detect_format(records)
        except DataError as exc:
            raise DataError(f"data file {path}: {exc}") from exc
    name = _ALIASES.get(format.lower(), format.lower())
    if name not in _MAPPERS and name not in _FILE_MAPPERS:
        raise DataError(f"unknown data format {format!r} for {path}; {_accepted()}")
    return name


def load_requests(
    path: str | Path | None = None,
    *,
    limit: int | None = None,
    offset: int = 0,
    format: str | None = None,
) -> list[EditRequest]:
    """Load edit requests from a benchmark file (or the packaged demo set when ``path`` is None).

    ``offset``/``limit`` select raw records in file order, as EasyEdit's ``[:K]``
    slicing does, so skipped zsRE records (empty ``alt``) count towards ``limit``
    and case ids stay equal to file positions.
    """
    file = demo_path() if path is None else Path(path)
    records = _read_records(file)
    name = _resolve_format(format, records, file)
    if name in _FILE_MAPPERS:  # formats whose requests depend on other records (or files)
        return _map_file(_FILE_MAPPERS[name](file), records, limit, offset, file, name)
    mapper = _MAPPERS[name]
    requests: list[EditRequest] = []
    skipped = 0
    for index, record in _window(records, limit, offset):
        request = _map_record(mapper, record, index, file, name)
        if request is None:
            skipped += 1
        else:
            requests.append(request)
    if skipped:
        logger.info("%s: skipped %d record(s) with an empty target (alt), as EasyEdit does", file, skipped)
    logger.debug("loaded %d %s request(s) from %s", len(requests), name, file)
    return requests


def empty_selection_reason(path: str | Path | None, *, limit: int | None, offset: int) -> str:
    """Say why :func:`load_requests` returned nothing, so the user learns which option to change."""
    records = _read_records(demo_path() if path is None else Path(path))
    where = f"{len(records)} record(s) in {'the demo set' if path is None else path}"
    if limit == 0:
        return f"the data selection is empty: --limit is 0 ({where}); pass a positive --limit"
    if offset >= len(records):
        return f"the data selection is empty: --offset {offset} is past the end ({where}); pass an --offset below {len(records)}"
    last = len(records) if limit is None else min(len(records), offset + limit)
    return (f"the data selection is empty: records {offset}..{last - 1} all have an empty target (alt) and are skipped, "
            f"as EasyEdit skips them ({where}); choose other records with --offset and --limit")


def _map_record(
    mapper: Callable[[Record, int], EditRequest | None], record: Record, index: int, path: Path, name: str
) -> EditRequest | None:
    try:
        return mapper(record, index)
    except (RequestError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"data file {path}: record {index} is not a valid {name} record: {exc}") from exc


def load_irrelevant_prompts(path: str | Path, *, limit: int | None = None, offset: int = 0) -> list[str]:
    """Unrelated texts ("prompt answer") from a benchmark file, used by WISE as its locality pool."""
    file = Path(path)
    records = _read_records(file)
    name = _resolve_format(None, records, file)
    if name not in _IRRELEVANT_FORMATS:
        raise DataError(
            f"data file {file} is in format {name!r}, which has no irrelevant-prompt pool; "
            f"use one of: {', '.join(_IRRELEVANT_FORMATS)}"
        )
    keys = ("loc", "loc_ans") if name == "zsre" else ("locality_prompt", "locality_ground_truth")
    texts = []
    for index, record in _window(records, limit, offset):
        prompt, answer = record.get(keys[0]), record.get(keys[1])
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise DataError(f"data file {file}: record {index} lacks string fields {keys[0]!r} and {keys[1]!r}")
        texts.append(f"{prompt} {answer}")
    return texts
