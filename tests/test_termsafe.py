"""Text mariner prints but did not write (guest output in messages, file names, config values,
SFTP error strings) reaches the terminal with its control characters escaped."""

from __future__ import annotations

import pytest

from mariner_dev.errors import MarinerError
from mariner_dev.fastexec import print_error
from mariner_dev.termsafe import printable

ATTACKS = ["\x1b]0;owned\x07", "\x1b[2J\x1b[H", "\x1b]52;c;ZWNobyBoaQ==\x07", "line\rover",
           "\x9b31m", "bi\u202edi", "nul\x00", "bs\x08\x7f", "\x1bP+q\x1b\\"]


@pytest.mark.parametrize("text", ATTACKS)
def test_no_control_character_survives(text):
    out = printable(text)
    assert all(ch.isprintable() for ch in out), repr(out)
    assert "\x1b" not in printable(text, keep_newlines=True)


def test_plain_text_and_mariner_s_own_line_breaks_are_kept():
    assert printable("~/.config/é ü 日本 [dotfiles] `mariner up`") == \
        "~/.config/é ü 日本 [dotfiles] `mariner up`"
    assert printable("a\nb", keep_newlines=True) == "a\nb"
    assert printable("a\nb") == "a\\nb"
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("tab\there") == "tab\\there"


def test_print_error_escapes_what_the_message_carries(capsys):
    print_error(MarinerError("the guest said: \x1b]0;owned\x07 ok\nsecond line",
                             hint="\x1b[2J"))
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b]0;owned\\x07 ok" in err and "  second line" in err and "\\x1b[2J" in err
