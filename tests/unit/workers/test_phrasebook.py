"""The phrasebook of the reference pipeline: word error rate and translation-memory lookups."""

from __future__ import annotations

import json

import pytest

from workers import phrasebook
from workers.fake_api import _translate
from workers.phrasebook import LANGUAGES, PHRASES, translate, word_error_rate


@pytest.mark.parametrize(("ref", "hyp", "wer"), [
    ("a b c", "a b c", 0.0),
    ("a b c", "a x c", 1 / 3),  # one substitution
    ("a b c", "a c", 1 / 3),  # one deletion
    ("a b c", "a b b c", 1 / 3),  # one insertion
    ("a b c d", "", 1.0),
    ("a b", "x y z w", 2.0),  # more errors than reference words
    ("", "", 0.0),
    ("", "a", 1.0),
    ("The Train, to the CITY!", "the train to the city", 0.0),  # case and punctuation do not count
])
def test_word_error_rate_counts_edits_over_the_reference_words(ref, hyp, wer):
    assert word_error_rate(ref, hyp) == pytest.approx(wer)


def test_every_sentence_has_every_language_and_plain_lower_case_words():
    for english, translations in PHRASES.items():
        assert set(translations) == set(LANGUAGES), english
        assert english == " ".join(phrasebook.normalize(english)), english  # what the recogniser can say


def test_a_transcript_gets_the_stored_translation_of_the_closest_sentence():
    english = "the train to the city leaves from platform number four"
    assert translate(english, "es") == (PHRASES[english]["es"], 1.0)
    # two words misheard: still that sentence, with a lower match
    found = translate("the rain to the city leaves from platform number for", "de")
    assert found is not None and found[0] == PHRASES[english]["de"]
    assert found[1] == pytest.approx(1 - 2 / 10)


def test_no_translation_for_unrelated_text_or_an_unknown_language():
    assert translate("completely different words here", "fr") is None
    assert translate("the train to the city leaves from platform number four", "it") is None


def test_the_fake_api_answers_from_the_phrasebook_and_keeps_its_other_answers():
    english = "the museum is open every day except monday"
    status, body = _translate(json.dumps({"text": english, "target": "fr"}).encode())
    assert (status, body) == (200, {"translation": PHRASES[english]["fr"], "target": "fr", "match": 1.0,
                                    "synthetic": True})
    assert _translate(b'{"text": "abc", "target": "reverse"}')[1]["translation"] == "cba"
    assert _translate(b'{"text": "abc", "target": "fr"}')[1]["translation"] == "ABC"  # no close sentence
    assert _translate(b'{"text": 3}')[0] == 400
