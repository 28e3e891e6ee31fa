"""Preference data the project writes itself: short questions with a format instruction a program can check.

Every prompt is a question with a known answer (a capital, an opposite, a plural, a past tense, a colour, a count,
some arithmetic) plus one instruction about the form of the reply ("Answer in all capital letters.", "Reply with
only the number.", 'Reply with a JSON object {"answer": ...}' ...). The chosen reply gives the right answer in the
requested form; the rejected reply gives the same right answer the way a small chat model answers by default, a
plain sentence ("The capital of Japan is Tokyo."), which ignores the instruction. So the preference is about
following the instruction only, and `check(kind, reply)` decides it for any reply, the model's own included.

All facts and wording are written here; nothing is downloaded. `make_split` is deterministic for a seed: the
questions are split into a training pool and a held-out pool, so no held-out prompt is ever trained on.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------- the facts
# (country as it reads in a sentence, capital); single-word capitals only, so "in one word" can be obeyed
CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Thailand", "Bangkok"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Colombia", "Bogota"),
    ("Ukraine", "Kyiv"),
    ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("South Korea", "Seoul"),
    ("Iceland", "Reykjavik"),
    ("the United Kingdom", "London"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"),
    ("Nepal", "Kathmandu"),
    ("Pakistan", "Islamabad"),
    ("Saudi Arabia", "Riyadh"),
    ("Iraq", "Baghdad"),
    ("Lebanon", "Beirut"),
    ("Jordan", "Amman"),
    ("Afghanistan", "Kabul"),
    ("Bangladesh", "Dhaka"),
    ("Switzerland", "Bern"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
    ("Estonia", "Tallinn"),
]
OPPOSITES = [
    ("hot", "cold"),
    ("up", "down"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("heavy", "light"),
    ("left", "right"),
    ("day", "night"),
    ("win", "lose"),
    ("push", "pull"),
    ("buy", "sell"),
    ("true", "false"),
    ("above", "below"),
    ("first", "last"),
    ("clean", "dirty"),
    ("near", "far"),
    ("inside", "outside"),
    ("sweet", "sour"),
    ("tall", "short"),
    ("cheap", "expensive"),
    ("easy", "difficult"),
    ("north", "south"),
    ("east", "west"),
    ("summer", "winter"),
    ("love", "hate"),
    ("remember", "forget"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("wide", "narrow"),
    ("young", "old"),
    ("safe", "dangerous"),
    ("arrive", "leave"),
]
PLURALS = [
    ("mouse", "mice"),
    ("child", "children"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("goose", "geese"),
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("ox", "oxen"),
    ("cactus", "cacti"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("wolf", "wolves"),
    ("box", "boxes"),
    ("city", "cities"),
    ("baby", "babies"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("deer", "deer"),
    ("bus", "buses"),
    ("potato", "potatoes"),
    ("tomato", "tomatoes"),
    ("hero", "heroes"),
    ("church", "churches"),
    ("dish", "dishes"),
    ("life", "lives"),
    ("shelf", "shelves"),
    ("half", "halves"),
    ("story", "stories"),
    ("party", "parties"),
    ("key", "keys"),
    ("toy", "toys"),
    ("glass", "glasses"),
    ("watch", "watches"),
    ("fox", "foxes"),
    ("class", "classes"),
    ("berry", "berries"),
    ("lady", "ladies"),
    ("loaf", "loaves"),
    ("louse", "lice"),
]
PAST_TENSES = [
    ("go", "went"),
    ("eat", "ate"),
    ("see", "saw"),
    ("run", "ran"),
    ("write", "wrote"),
    ("take", "took"),
    ("give", "gave"),
    ("come", "came"),
    ("speak", "spoke"),
    ("drink", "drank"),
    ("swim", "swam"),
    ("sing", "sang"),
    ("begin", "began"),
    ("break", "broke"),
    ("buy", "bought"),
    ("think", "thought"),
    ("bring", "brought"),
    ("teach", "taught"),
    ("catch", "caught"),
    ("fly", "flew"),
    ("grow", "grew"),
    ("know", "knew"),
    ("throw", "threw"),
    ("draw", "drew"),
    ("sleep", "slept"),
    ("keep", "kept"),
    ("feel", "felt"),
    ("meet", "met"),
    ("sit", "sat"),
    ("stand", "stood"),
    ("forget", "forgot"),
    ("choose", "chose"),
    ("drive", "drove"),
    ("ride", "rode"),
    ("wake", "woke"),
    ("wear", "wore"),
    ("steal", "stole"),
    ("find", "found"),
    ("hold", "held"),
    ("tell", "told"),
    ("sell", "sold"),
    ("build", "built"),
    ("send", "sent"),
    ("spend", "spent"),
    ("lose", "lost"),
    ("pay", "paid"),
    ("say", "said"),
    ("make", "made"),
    ("hear", "heard"),
    ("walk", "walked"),
    ("jump", "jumped"),
    ("play", "played"),
    ("cook", "cooked"),
    ("dance", "danced"),
    ("talk", "talked"),
]
# (thing as the subject of a sentence, colour)
COLOURS = [
    ("the sky on a clear day", "blue"),
    ("fresh grass", "green"),
    ("snow", "white"),
    ("a ripe banana", "yellow"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("a carrot", "orange"),
    ("milk", "white"),
    ("a crow", "black"),
    ("a strawberry", "red"),
    ("chocolate", "brown"),
    ("a lime", "green"),
    ("a polar bear", "white"),
    ("a fire truck", "red"),
    ("an emerald", "green"),
    ("a sapphire", "blue"),
    ("an eggplant", "purple"),
    ("a flamingo", "pink"),
    ("a lemon", "yellow"),
    ("soil", "brown"),
    ("a pumpkin", "orange"),
    ("ash", "grey"),
    ("a school bus in the United States", "yellow"),
    ("the ocean on a sunny day", "blue"),
    ("a raven", "black"),
]
# (question, sentence with {n}, number)
COUNTS = [
    ("How many days are in a week?", "There are {n} days in a week.", 7),
    ("How many months are in a year?", "There are {n} months in a year.", 12),
    ("How many hours are in a day?", "There are {n} hours in a day.", 24),
    ("How many minutes are in an hour?", "There are {n} minutes in an hour.", 60),
    ("How many seconds are in a minute?", "There are {n} seconds in a minute.", 60),
    ("How many sides does a triangle have?", "A triangle has {n} sides.", 3),
    ("How many sides does a square have?", "A square has {n} sides.", 4),
    ("How many sides does a pentagon have?", "A pentagon has {n} sides.", 5),
    ("How many sides does a hexagon have?", "A hexagon has {n} sides.", 6),
    ("How many sides does an octagon have?", "An octagon has {n} sides.", 8),
    ("How many days are in a leap year?", "There are {n} days in a leap year.", 366),
    ("How many weeks are in a year?", "There are {n} weeks in a year.", 52),
    ("How many players does a soccer team have on the field?", "A soccer team has {n} players on the field.", 11),
    ("How many planets are in the solar system?", "There are {n} planets in the solar system.", 8),
    ("How many letters are in the English alphabet?", "There are {n} letters in the English alphabet.", 26),
    ("How many cents are in a dollar?", "There are {n} cents in a dollar.", 100),
    ("How many centimeters are in a meter?", "There are {n} centimeters in a meter.", 100),
    ("How many grams are in a kilogram?", "There are {n} grams in a kilogram.", 1000),
    ("How many wheels does a bicycle have?", "A bicycle has {n} wheels.", 2),
    ("How many wheels does a tricycle have?", "A tricycle has {n} wheels.", 3),
    ("How many strings does a standard guitar have?", "A standard guitar has {n} strings.", 6),
    ("How many keys does a standard piano have?", "A standard piano has {n} keys.", 88),
    ("How many days are in January?", "There are {n} days in January.", 31),
    ("How many days are in April?", "There are {n} days in April.", 30),
    ("How many hours are in a week?", "There are {n} hours in a week.", 168),
    ("How many years are in a century?", "There are {n} years in a century.", 100),
    ("How many years are in a decade?", "There are {n} years in a decade.", 10),
    ("How many eggs are in a dozen?", "There are {n} eggs in a dozen.", 12),
    ("How many legs does a spider have?", "A spider has {n} legs.", 8),
    ("How many legs does a dog have?", "A dog has {n} legs.", 4),
    ("How many legs does a chicken have?", "A chicken has {n} legs.", 2),
    ("How many legs does an ant have?", "An ant has {n} legs.", 6),
    ("How many legs does a horse have?", "A horse has {n} legs.", 4),
    ("How many legs does a bee have?", "A bee has {n} legs.", 6),
    ("How many legs does a penguin have?", "A penguin has {n} legs.", 2),
    ("How many legs does a crab have?", "A crab has {n} legs.", 10),
    ("How many legs does a cow have?", "A cow has {n} legs.", 4),
    ("How many legs does a butterfly have?", "A butterfly has {n} legs.", 6),
]


@dataclass(frozen=True)
class Question:
    """A question, its short answer and the plain sentence a chat model answers it with."""

    text: str
    answer: str
    sentence: str
    numeric: bool
    family: str


def _questions(rng: random.Random, arithmetic: int) -> list[Question]:
    qs = []
    for country, city in CAPITALS:
        qs.append(
            Question(
                f"What is the capital of {country}?", city, f"The capital of {country} is {city}.", False, "capital"
            )
        )
    for word, opposite in OPPOSITES:
        qs.append(
            Question(
                f'What is the opposite of "{word}"?',
                opposite,
                f'The opposite of "{word}" is "{opposite}".',
                False,
                "opposite",
            )
        )
    for word, plural in PLURALS:
        qs.append(
            Question(
                f'What is the plural of "{word}"?', plural, f'The plural of "{word}" is "{plural}".', False, "plural"
            )
        )
    for verb, past in PAST_TENSES:
        qs.append(
            Question(
                f'What is the past tense of "{verb}"?',
                past,
                f'The past tense of "{verb}" is "{past}".',
                False,
                "past tense",
            )
        )
    for thing, colour in COLOURS:
        qs.append(
            Question(f"What color is {thing}?", colour, f"{thing[0].upper()}{thing[1:]} is {colour}.", False, "colour")
        )
    for question, sentence, n in COUNTS:
        qs.append(Question(question, str(n), sentence.format(n=n), True, "count"))
    seen = set()
    while len(seen) < arithmetic:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(5, 60), rng.randint(2, 40))
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        sign = {"+": "+", "-": "-", "*": "x"}[op]
        qs.append(Question(f"What is {a} {word} {b}?", str(value), f"{a} {sign} {b} = {value}.", True, "arithmetic"))
    return qs


# ----------------------------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class Instruction:
    """A format instruction: its kind (the key of its checker and of the reply that obeys it, see `check` and
    `obeying_reply`), its phrasings, and which questions it fits."""

    kind: str
    phrasings: tuple[str, ...]
    numeric: bool | None  # True: numeric questions only, False: word answers only, None: any


FOLLOW_UPS = (
    "Would you like to know more?",
    "Shall I give you another one?",
    "Do you want to try a harder question?",
    "What would you like to ask next?",
    "Is there anything else you want to know?",
    "Can I help with anything else?",
)

INSTRUCTIONS = (
    Instruction(
        "uppercase",
        ("Answer in all capital letters.", "Write your whole answer in capital letters.", "Reply in uppercase only."),
        False,
    ),
    Instruction(
        "lowercase",
        (
            "Answer in lowercase letters only.",
            "Write your whole answer in lowercase.",
            "Use no capital letters in your reply.",
        ),
        False,
    ),
    Instruction("one word", ("Answer in one word.", "Reply with a single word.", "Use just one word."), False),
    Instruction(
        "number only",
        ("Reply with only the number.", "Answer with just the number, nothing else.", "Give only the number."),
        True,
    ),
    Instruction(
        "json",
        (
            'Reply with a JSON object {"answer": ...} and nothing else.',
            'Answer in JSON of the form {"answer": <your answer>}.',
            'Format your reply as a JSON object with the single key "answer".',
        ),
        None,
    ),
    Instruction(
        "answer prefix",
        (
            'Begin your reply with "Answer:".',
            'Start your reply with "Answer:".',
            'Your reply must begin with "Answer:".',
        ),
        None,
    ),
    Instruction(
        "ends with question",
        (
            "End your reply with a question.",
            "Finish your reply by asking me a question.",
            "Make the last sentence of your reply a question.",
        ),
        None,
    ),
)
KINDS = tuple(i.kind for i in INSTRUCTIONS)
_BY_KIND = {i.kind: i for i in INSTRUCTIONS}


def obeying_reply(kind: str, q: Question, rng: random.Random) -> str:
    """The chosen reply: the right answer in the form `kind` asks for."""
    if kind == "uppercase":
        return q.sentence.upper()
    if kind == "lowercase":
        return q.sentence.lower()
    if kind == "one word":
        return q.answer[0].upper() + q.answer[1:] + "."
    if kind == "number only":
        return q.answer
    if kind == "json":
        return json.dumps({"answer": int(q.answer) if q.numeric else q.answer})
    if kind == "answer prefix":
        return f"Answer: {q.answer}."
    if kind == "ends with question":
        return f"{q.sentence} {rng.choice(FOLLOW_UPS)}"
    raise ValueError(f"unknown instruction kind {kind!r}; known: {', '.join(KINDS)}")


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def check(kind: str, reply: str) -> bool:
    """Whether `reply` obeys the instruction `kind` (the form only; the content is `mentions_answer`'s job)."""
    text = reply.strip()
    letters = [c for c in text if c.isalpha()]
    if kind == "uppercase":
        return bool(letters) and not any(c.islower() for c in letters)
    if kind == "lowercase":
        return bool(letters) and not any(c.isupper() for c in letters)
    if kind == "one word":
        return _WORD.fullmatch(text.rstrip(".!")) is not None
    if kind == "number only":
        return re.fullmatch(r"-?\d+(\.\d+)?", text.rstrip(".").replace(",", "")) is not None
    if kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return isinstance(value, dict) and list(value) == ["answer"]
    if kind == "answer prefix":
        return text.startswith("Answer:") and len(text) > len("Answer:")
    if kind == "ends with question":
        return text.endswith("?")
    raise ValueError(f"unknown instruction kind {kind!r}; known: {', '.join(KINDS)}")


def mentions_answer(reply: str, answer: str) -> bool:
    """Whether the expected answer appears in `reply` as a whole word or number (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(answer.lower())}(?![\w])", reply.lower()) is not None


# ----------------------------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class Item:
    """One prompt of the data set, with what a checker needs to judge any reply to it."""

    prompt: str
    kind: str
    question: Question
    chosen: str
    rejected: str

    def row(self) -> dict:
        """A conversational preference row (message lists, rendered with the model's chat template)."""
        return {
            "prompt": [{"role": "user", "content": self.prompt}],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


def _items(questions: list[Question], n: int, rng: random.Random) -> list[Item]:
    """`n` distinct prompts, the instruction kinds in turn; ValueError when the questions cannot make that many."""
    by_numeric = {True: [q for q in questions if q.numeric], False: [q for q in questions if not q.numeric]}
    pools: dict[bool, list[Question]] = {True: [], False: []}
    used, items = set(), []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot write {n} distinct prompts from {len(questions)} questions; ask for fewer")
        instruction = INSTRUCTIONS[len(items) % len(INSTRUCTIONS)]
        numeric = instruction.numeric if instruction.numeric is not None else rng.random() < 0.4
        if not pools[numeric]:  # cycle through the questions so every one is used before any repeats
            pools[numeric] = list(by_numeric[numeric])
            rng.shuffle(pools[numeric])
        q = pools[numeric].pop()
        phrasing = rng.choice(instruction.phrasings)
        prompt = f"{q.text} {phrasing}" if rng.random() < 0.75 else f"{phrasing} {q.text}"
        if prompt in used:
            continue
        used.add(prompt)
        chosen = obeying_reply(instruction.kind, q, rng)
        items.append(Item(prompt, instruction.kind, q, chosen, q.sentence))
    return items


def make_split(train: int = 336, held_out: int = 70, seed: int = 0, held_out_share: float = 0.25):
    """(train items, held-out items), deterministic for `seed`.

    The questions are split first (a `held_out_share` of each family goes to the held-out pool), so a held-out
    prompt never shares its question with a training prompt. The instruction kinds take turns, so each kind has
    about the same number of prompts in both splits.
    """
    rng = random.Random(seed)
    questions = _questions(random.Random(1_000 + seed), arithmetic=120)
    train_q, held_q = [], []
    for family in dict.fromkeys(q.family for q in questions):
        members = [q for q in questions if q.family == family]
        rng.shuffle(members)
        cut = max(1, round(len(members) * held_out_share))
        held_q += members[:cut]
        train_q += members[cut:]
    train_items = _items(train_q, train, rng)
    held_items = _items(held_q, held_out, rng)
    return train_items, held_items
