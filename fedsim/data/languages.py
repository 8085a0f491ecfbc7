"""Templated translations of the synthetic benchmark, for the ``multilingual`` scenario.

The synthetic generator writes every string from a small vocabulary (fedsim/data/synthetic.py), so a
sample translates exactly by table: the question and option texts as whole strings, open answers as
words, and notes piece by piece (subject, verb, two describing words; or the pointing template). The
chat scaffolding ("Note:", "Options:") stays English, as an instruction-tuned model's template would.
"""

from __future__ import annotations

from fedsim.data import synthetic as syn

# English word or phrase -> translation, per language. "en" is the identity.
_WORDS: dict[str, dict[str, str]] = {
    "de": {
        # colours (open answers and option texts)
        "red": "rot", "orange": "orange", "yellow": "gelb", "green": "grün", "blue": "blau", "purple": "lila",
        # describing words of a note
        "fragile": "zerbrechlich", "delicate": "empfindlich", "brittle": "spröde", "flimsy": "wackelig",
        "sturdy": "stabil", "solid": "solide", "robust": "robust", "tough": "zäh",
        "plain": "schlicht", "used": "gebraucht", "old": "alt", "new": "neu", "heavy": "schwer", "light": "leicht",
        "square": "eckig", "round": "rund",
        "sunny": "sonnig", "toasty": "mollig", "fiery": "feurig", "icy": "eisig", "frosty": "frostig", "chilly": "kühl",
        "the parcel": "das Paket", "this box": "diese Schachtel", "the crate": "die Kiste",
        "our package": "unser Päckchen",
        "is": "ist", "looks": "wirkt", "seems": "scheint", "feels": "fühlt sich", "and": "und",
        "left": "linken", "west": "westlichen", "first": "ersten",
        "right": "rechten", "east": "östlichen", "second": "zweiten",
        "yes": "ja", "no": "nein",
    },
    "fr": {
        "red": "rouge", "orange": "orange", "yellow": "jaune", "green": "vert", "blue": "bleu", "purple": "violet",
        "fragile": "fragile", "delicate": "délicat", "brittle": "cassant", "flimsy": "frêle",
        "sturdy": "solide", "solid": "massif", "robust": "robuste", "tough": "résistant",
        "plain": "simple", "used": "usagé", "old": "vieux", "new": "neuf", "heavy": "lourd", "light": "léger",
        "square": "carré", "round": "rond",
        "sunny": "ensoleillé", "toasty": "tiède", "fiery": "ardent", "icy": "glacé", "frosty": "givré", "chilly": "frais",
        "the parcel": "le colis", "this box": "cette boîte", "the crate": "la caisse",
        "our package": "notre paquet",
        "is": "est", "looks": "a l'air", "seems": "semble", "feels": "paraît", "and": "et",
        "left": "de gauche", "west": "à l'ouest", "first": "en premier",
        "right": "de droite", "east": "à l'est", "second": "en second",
        "yes": "oui", "no": "non",
    },
    "es": {
        "red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
        "purple": "morado",
        "fragile": "frágil", "delicate": "delicado", "brittle": "quebradizo", "flimsy": "endeble",
        "sturdy": "resistente", "solid": "sólido", "robust": "robusto", "tough": "duro",
        "plain": "sencillo", "used": "usado", "old": "viejo", "new": "nuevo", "heavy": "pesado",
        "light": "ligero", "square": "cuadrado", "round": "redondo",
        "sunny": "soleado", "toasty": "calentito", "fiery": "ardiente", "icy": "helado", "frosty": "escarchado",
        "chilly": "fresco",
        "the parcel": "el paquete", "this box": "esta caja", "the crate": "el cajón",
        "our package": "nuestro bulto",
        "is": "es", "looks": "parece", "seems": "luce", "feels": "se siente", "and": "y",
        "left": "de la izquierda", "west": "del oeste", "first": "primero",
        "right": "de la derecha", "east": "del este", "second": "segundo",
        "yes": "sí", "no": "no",
    },
}

# Whole strings: questions, option texts and the pointing-note template.
_SENTENCES: dict[str, dict[str, str]] = {
    "de": {
        syn.CLASS_QUESTION: "Wie soll das Paket beschriftet werden?",
        syn.VQA_QUESTION: "Welche Farbe hat der Gegenstand, auf den die Notiz zeigt?",
        syn.TEXTQA_QUESTION: "Kann man andere Pakete darauf stapeln?",
        "warm fragile": "warm zerbrechlich", "warm sturdy": "warm stabil",
        "cool fragile": "kalt zerbrechlich", "cool sturdy": "kalt stabil",
        syn.POINTING_NOTE: "die Notiz zeigt auf den {side} Gegenstand",
    },
    "fr": {
        syn.CLASS_QUESTION: "Quelle étiquette mettre sur le colis ?",
        syn.VQA_QUESTION: "De quelle couleur est l'objet désigné par la note ?",
        syn.TEXTQA_QUESTION: "Peut-on empiler d'autres colis dessus ?",
        "warm fragile": "chaud fragile", "warm sturdy": "chaud solide",
        "cool fragile": "froid fragile", "cool sturdy": "froid solide",
        syn.POINTING_NOTE: "la note désigne l'objet {side}",
    },
    "es": {
        syn.CLASS_QUESTION: "¿Cómo se debe etiquetar el paquete?",
        syn.VQA_QUESTION: "¿De qué color es el objeto que indica la nota?",
        syn.TEXTQA_QUESTION: "¿Se pueden apilar otros paquetes encima?",
        "warm fragile": "cálido frágil", "warm sturdy": "cálido resistente",
        "cool fragile": "frío frágil", "cool sturdy": "frío resistente",
        syn.POINTING_NOTE: "la nota señala el objeto {side}",
    },
}

LANGUAGES = ("en", *_WORDS)


def _note(text: str, lang: str) -> str:
    """Translate a note of the form '<subject> <verb> <word> and <word>' or the pointing template."""
    words, sentences = _WORDS[lang], _SENTENCES[lang]
    pointing = syn.POINTING_NOTE.split("{side}")
    if text.startswith(pointing[0]) and text.endswith(pointing[1]):
        side = text[len(pointing[0]):len(text) - len(pointing[1])]
        return sentences[syn.POINTING_NOTE].format(side=words[side])
    subject = " ".join(text.split()[:2])
    verb, first, conj, second = text.split()[2:]
    if subject not in words or conj != "and":
        raise ValueError(f"note {text!r} is not from the synthetic benchmark's templates; cannot translate it")
    return " ".join((words[subject], words[verb], words[first], words[conj], words[second]))


def translate(sample: dict, lang: str) -> dict:
    """The same sample with question, note, option texts and open answer in ``lang``."""
    if lang == "en":
        return sample
    if lang not in _WORDS:
        raise ValueError(f"language {lang!r} has no translation table: expected one of {', '.join(LANGUAGES)}")
    if not sample["source"].startswith("synthetic"):
        raise ValueError(f"the multilingual scenario translates the synthetic benchmark's templates only; "
                         f"a row from {sample['source']!r} cannot be translated")
    sentences = _SENTENCES[lang]
    out = dict(sample)
    out["question"] = sentences[sample["question"]]
    out["options"] = [sentences[o] for o in sample["options"]]
    if sample["text"] is not None:
        out["text"] = _note(sample["text"], lang)
    if not sample["options"]:  # open answer: a colour word or yes/no; option letters stay letters
        out["answer"] = _WORDS[lang][sample["answer"]]
    return out
