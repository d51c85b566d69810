"""Fact lists for the contrastive tasks, written for mechsteer.

Kept as plain data so that a tokenizer decides which items are usable: task generators
drop the items whose answers are not single tokens for the model at hand.
"""

from __future__ import annotations

# (country, capital). Countries whose capital is a well-known single word.
COUNTRY_CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("Czechia", "Prague"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"),
    ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
    ("Israel", "Jerusalem"),
    ("Jordan", "Amman"),
    ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Senegal", "Dakar"),
    ("Morocco", "Rabat"),
    ("Tunisia", "Tunis"),
    ("China", "Beijing"),
    ("India", "Delhi"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"),
    ("Malaysia", "Kuala"),
    ("Korea", "Seoul"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Afghanistan", "Kabul"),
    ("Australia", "Canberra"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico"),
    ("Cuba", "Havana"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Argentina", "Buenos"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"),
    ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"),
    ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"),
    ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"),
]
# Countries named after their capital, or whose capital word alone is ambiguous, are
# excluded from CCC (the true and the in-context capital must differ and be nameable).
CCC_EXCLUDE = {"Mexico", "Addis", "Kuala", "Buenos"}

# First names (single words); the IOI generator keeps those that are one token.
NAMES: list[str] = [
    "Mary", "John", "Anne", "Tom", "James", "Sarah", "David", "Emma", "Michael", "Laura",
    "Paul", "Kate", "Mark", "Lisa", "Peter", "Alice", "Robert", "Jane", "Daniel", "Rachel",
    "Chris", "Amy", "Steven", "Helen", "George", "Lucy", "Jack", "Anna", "Sam", "Maria",
    "Brian", "Julia", "Kevin", "Emily", "Eric", "Grace", "Frank", "Rose", "Adam", "Claire",
    "Ben", "Jessica", "Alex", "Linda", "Ryan", "Karen", "Matt", "Nancy", "Jason", "Susan",
]

# Objects given in IOI sentences.
OBJECTS: list[str] = [
    "book", "ball", "drink", "key", "letter", "ring", "bag", "hat", "phone", "gift",
    "cake", "pen", "box", "card", "pencil", "bottle", "map", "camera", "ticket", "coin",
]

# Places for IOI templates.
PLACES: list[str] = [
    "store", "park", "school", "office", "station", "market", "library", "garden",
    "restaurant", "hospital", "beach", "museum",
]

# IOI templates of the Wang et al. (2022) kind. {A} is the indirect object (the answer),
# {B} the subject, who appears twice; the corrupted prompt swaps the second {B} for {A}.
IOI_TEMPLATES: list[str] = [
    "When {A} and {B} went to the {place}, {B} gave the {object} to",
    "When {A} met with {B}, {B} gave the {object} to",
    "After {A} and {B} went to the {place}, {B} gave a {object} to",
    "Then, {A} and {B} had a long talk. {B} handed the {object} to",
    "While {A} and {B} were at the {place}, {B} passed the {object} to",
]

# Country-capital conflict (Stoehr et al., Table 1): the context asserts a wrong capital
# ({capital}), the question asks for the real one. Index 0 is the paper's template; the
# others keep the conflict but differ in token length (SmolLM2: 18, 15, 20, 25 tokens;
# the tiny tokenizer: 19, 18, 26, 37), for transfer across templates (seed paper 003, Sec. 5).
CCC_TEMPLATES: list[str] = [
    "The capital of {country} is {capital}. Q: What is the capital of {country}? A:",
    "The capital of {country} is {capital}. Q: Capital of {country}? A:",
    "We know the capital of {country} is {capital}. Q: What is the capital of {country}? A:",
    "According to the text, the capital city of {country} is {capital}. Q: What is the capital city of {country}? A:",
]
CCC_TEMPLATE = CCC_TEMPLATES[0]  # alias kept for existing code
