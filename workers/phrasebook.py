"""The phrasebook of the reference pipeline: English sentences and their translations.

The demo's sessions speak these sentences; the fake translation API (``workers.fake_api``) answers
from them the way a translation memory does (the stored translation of the closest sentence);
the speech recogniser's language model is built from them (a domain language model, as
voice-menu systems use: see ``docs/operations.md#the-demos-real-pipeline``).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["LANGUAGES", "PHRASES", "normalize", "sentence", "translate", "word_error_rate"]

#: the least similarity (1 - word error rate) at which a stored translation is used
MIN_MATCH = 0.5

#: target languages: each has an eSpeak NG voice and a column below
LANGUAGES = ("de", "fr", "es")

#: English sentence -> {language: translation}
PHRASES: dict[str, dict[str, str]] = {
    "please send the report to the office before noon on friday": {
        "de": "Bitte schicken Sie den Bericht vor Freitagmittag an das Büro.",
        "fr": "Veuillez envoyer le rapport au bureau avant midi vendredi.",
        "es": "Por favor, envíe el informe a la oficina antes del mediodía del viernes.",
    },
    "the weather today is cold and windy with rain in the evening": {
        "de": "Das Wetter ist heute kalt und windig, am Abend regnet es.",
        "fr": "Aujourd'hui il fait froid et il y a du vent, avec de la pluie le soir.",
        "es": "Hoy hace frío y viento, con lluvia por la noche.",
    },
    "we will meet at the station at seven in the morning": {
        "de": "Wir treffen uns um sieben Uhr morgens am Bahnhof.",
        "fr": "Nous nous retrouverons à la gare à sept heures du matin.",
        "es": "Nos veremos en la estación a las siete de la mañana.",
    },
    "the train to the city leaves from platform number four": {
        "de": "Der Zug in die Stadt fährt von Gleis vier ab.",
        "fr": "Le train pour la ville part du quai numéro quatre.",
        "es": "El tren a la ciudad sale del andén número cuatro.",
    },
    "can you tell me where the nearest hospital is": {
        "de": "Können Sie mir sagen, wo das nächste Krankenhaus ist?",
        "fr": "Pouvez-vous me dire où se trouve l'hôpital le plus proche ?",
        "es": "¿Puede decirme dónde está el hospital más cercano?",
    },
    "i would like a table for two people by the window": {
        "de": "Ich hätte gern einen Tisch für zwei Personen am Fenster.",
        "fr": "Je voudrais une table pour deux personnes près de la fenêtre.",
        "es": "Quisiera una mesa para dos personas junto a la ventana.",
    },
    "the meeting has been moved to next tuesday afternoon": {
        "de": "Die Besprechung wurde auf nächsten Dienstagnachmittag verschoben.",
        "fr": "La réunion a été déplacée à mardi prochain après-midi.",
        "es": "La reunión se ha cambiado al próximo martes por la tarde.",
    },
    "my phone battery is almost empty and i need a charger": {
        "de": "Der Akku meines Telefons ist fast leer und ich brauche ein Ladegerät.",
        "fr": "La batterie de mon téléphone est presque vide et j'ai besoin d'un chargeur.",
        "es": "La batería de mi teléfono está casi vacía y necesito un cargador.",
    },
    "the museum is open every day except monday": {
        "de": "Das Museum ist jeden Tag außer Montag geöffnet.",
        "fr": "Le musée est ouvert tous les jours sauf le lundi.",
        "es": "El museo abre todos los días excepto los lunes.",
    },
    "how much does a ticket to the airport cost": {
        "de": "Wie viel kostet eine Fahrkarte zum Flughafen?",
        "fr": "Combien coûte un billet pour l'aéroport ?",
        "es": "¿Cuánto cuesta un billete al aeropuerto?",
    },
    "the children are playing in the garden behind the house": {
        "de": "Die Kinder spielen im Garten hinter dem Haus.",
        "fr": "Les enfants jouent dans le jardin derrière la maison.",
        "es": "Los niños están jugando en el jardín detrás de la casa.",
    },
    "please turn off the lights when you leave the room": {
        "de": "Bitte schalten Sie das Licht aus, wenn Sie den Raum verlassen.",
        "fr": "Veuillez éteindre la lumière en quittant la pièce.",
        "es": "Por favor, apague las luces cuando salga de la habitación.",
    },
    "the doctor said i should drink more water every day": {
        "de": "Der Arzt sagte, ich solle jeden Tag mehr Wasser trinken.",
        "fr": "Le médecin a dit que je devrais boire plus d'eau chaque jour.",
        "es": "El médico dijo que debería beber más agua todos los días.",
    },
    "our flight was delayed for three hours because of the storm": {
        "de": "Unser Flug hatte wegen des Sturms drei Stunden Verspätung.",
        "fr": "Notre vol a été retardé de trois heures à cause de la tempête.",
        "es": "Nuestro vuelo se retrasó tres horas por la tormenta.",
    },
    "she reads a book on the bus every morning": {
        "de": "Sie liest jeden Morgen im Bus ein Buch.",
        "fr": "Elle lit un livre dans le bus tous les matins.",
        "es": "Ella lee un libro en el autobús todas las mañanas.",
    },
    "the shop on the corner sells fresh bread and milk": {
        "de": "Der Laden an der Ecke verkauft frisches Brot und Milch.",
        "fr": "Le magasin du coin vend du pain frais et du lait.",
        "es": "La tienda de la esquina vende pan fresco y leche.",
    },
}

_SENTENCES = list(PHRASES)


def sentence(i: int) -> str:
    """The ``i``-th sentence of the phrasebook (wrapping around)."""
    return _SENTENCES[i % len(_SENTENCES)]


def normalize(text: str) -> list[str]:
    """Lower-case words without punctuation or accents' case (the unit of the word error rate)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[\w']+", text)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) over the reference's length.

    ``word_error_rate("a b c", "a x c") == 1/3``; an empty reference gives 0.0 for an empty
    hypothesis and 1.0 otherwise.
    """
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (word != other))
    return row[-1] / len(ref)


def translate(text: str, lang: str) -> tuple[str, float] | None:
    """The stored translation of the phrasebook sentence closest to ``text``, and how close it is
    (1.0: the same words), or None when ``lang`` has no column or no sentence is at least
    ``MIN_MATCH`` alike: a translation memory's fuzzy match."""
    if lang not in LANGUAGES:
        return None
    best, score = "", 0.0
    for english in _SENTENCES:
        similarity = max(0.0, 1.0 - word_error_rate(english, text))
        if similarity > score:
            best, score = english, similarity
    if score < MIN_MATCH:
        return None
    return PHRASES[best][lang], score
