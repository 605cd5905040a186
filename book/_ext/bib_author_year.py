"""Sphinx extension of the book: the bibliography's labels in author-year form, as the citations in the text.

The text cites as "Hinton et al. (2015)" (``bibtex_reference_style: author_year``); pybtex's
``plain`` style would label the list [1], [2], ... This registers ``plain_author_year``: pybtex's
``plain`` formatting and sorting (first author, year, title) with labels "Hinton et al., 2015",
"Zagoruyko and Komodakis, 2017", "Matsubara, 2021", and a, b suffixes should two labels coincide.
``_config.yml`` loads it as a local extension and names the style in ``bibtex_default_style``.
"""

from __future__ import annotations

from pybtex.plugin import register_plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels.alpha import LabelStyle as AlphaLabelStyle


def _last_name(person) -> str:
    return " ".join(person.last_names).replace("{", "").replace("}", "")


class AuthorYearLabelStyle(AlphaLabelStyle):
    """``Surname, year``, ``Surname and Surname, year`` or ``Surname et al., year`` (alpha's de-duplication)."""

    def format_label(self, entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_last_name(p) for p in persons]
        if not names:
            who = entry.fields.get("title", entry.key)
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(PlainStyle):
    default_label_style = "author_year"


def setup(app):
    register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
    register_plugin("pybtex.style.formatting", "plain_author_year", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
