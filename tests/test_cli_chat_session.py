"""``cli.chat_session``: what each typed line does in the interactive ``mlxrunner run``, without
a terminal or an event loop."""

from __future__ import annotations

import pytest

from actors.messages import ChatMessage
from cli.chat_session import Ask, ChatSession, Leave, More, Say, ShowInfo
from runtime.errors import OptionsError


def _ask(session: ChatSession, line: str) -> Ask:
    action = session.feed(line)
    assert isinstance(action, Ask), action
    return action


def _say(session: ChatSession, line: str) -> str:
    action = session.feed(line)
    assert isinstance(action, Say), action
    return action.text


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def test_a_line_asks_with_the_conversation_so_far() -> None:
    session = ChatSession()
    first = _ask(session, "Hi there")
    assert first.request.messages == (_user("Hi there"),)
    assert first.user == "Hi there"
    session.answered(first.user, "Hello!")
    second = _ask(session, "And then?")
    assert second.request.messages == (
        _user("Hi there"),
        ChatMessage(role="assistant", content="Hello!"),
        _user("And then?"),
    )


def test_an_unanswered_turn_stays_out_of_the_history() -> None:
    session = ChatSession()
    _ask(session, "stopped with Ctrl-C")  # the loop never calls answered()
    assert _ask(session, "again").request.messages == (_user("again"),)


def test_clear_forgets_the_conversation() -> None:
    session = ChatSession()
    session.answered("a", "b")
    assert _say(session, "/clear") == "Cleared session context"
    assert _ask(session, "c").request.messages == (_user("c"),)


@pytest.mark.parametrize("line", ["/bye", "/exit", "  /bye  "])
def test_bye_leaves(line: str) -> None:
    assert isinstance(ChatSession().feed(line), Leave)


@pytest.mark.parametrize("line", ["", "   ", '""""""'])
def test_an_empty_line_asks_nothing(line: str) -> None:
    assert isinstance(ChatSession().feed(line), More)


def test_triple_quotes_make_one_message_of_several_lines() -> None:
    session = ChatSession()
    assert isinstance(session.feed('"""first line'), More)
    assert session.prompt == "... "
    assert isinstance(session.feed("  second, indented"), More)
    assert isinstance(session.feed("/bye is text here"), More)
    ask = _ask(session, 'last"""')
    assert ask.user == "first line\n  second, indented\n/bye is text here\nlast"
    assert session.prompt == ">>> "


def test_triple_quotes_on_lines_of_their_own() -> None:
    session = ChatSession()
    assert isinstance(session.feed('"""'), More)
    assert isinstance(session.feed("one"), More)
    assert _ask(session, '"""').user == "one"
    assert _ask(session, '"""on one line"""').user == "on one line"


def test_set_parameter_changes_the_next_request() -> None:
    session = ChatSession(parameters={"temperature": 0.5})
    assert _say(session, "/set parameter temperature 0") == "Set parameter 'temperature' to '0'"
    _say(session, "/set parameter top_k 3")
    _say(session, "/set parameter num_predict 7")
    _say(session, "/set parameter num_ctx 512")
    _say(session, '/set parameter stop "<end>" "two words"')
    options = _ask(session, "hi").request.options
    assert options.sampling.temperature == 0.0
    assert options.sampling.top_k == 3
    assert options.num_predict == 7
    assert options.num_ctx == 512
    assert options.stop == ("<end>", "two words")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/set parameter temperature hot", "temperature must be a number, got 'hot'"),
        ("/set parameter top_k 1.5", "top_k must be a whole number"),
        ("/set parameter top_p 2", "top_p must be in"),
        ("/set parameter temperature nan", "temperature"),
        ("/set parameter num_ctx 0", "num_ctx must be >= 1"),
        ("/set parameter seed 1 2", "seed takes one value"),
        ("/set parameter stop 'unclosed", "Couldn't set parameter"),
    ],
)
def test_a_bad_parameter_is_refused_and_changes_nothing(line: str, message: str) -> None:
    session = ChatSession(parameters={"temperature": 0.5})
    text = _say(session, line)
    assert text.startswith("Couldn't set parameter")
    assert message in text
    assert session.parameters == {"temperature": 0.5}


def test_unknown_parameters_and_commands_say_what_exists() -> None:
    session = ChatSession()
    assert "temperature" in _say(session, "/set parameter warmth 3")
    assert "temperature" in _say(session, "/set parameter")
    assert "/?" in _say(session, "/frobnicate")
    assert "/set parameter" in _say(session, "/?")
    assert "Usage" in _say(session, "/set colour blue")


def test_system_message_leads_every_request() -> None:
    session = ChatSession()
    assert _say(session, "/show system") == "No system message was specified."
    assert _say(session, "/set system You are terse.") == "Set system message."
    assert _say(session, "/show system") == "You are terse."
    session.answered("a", "b")
    messages = _ask(session, "c").request.messages
    assert messages is not None
    assert messages[0] == ChatMessage(role="system", content="You are terse.")
    assert len(messages) == 4
    _say(session, "/set system")
    assert _ask(session, "c").request.messages == (_user("a"), messages[2], _user("c"))


def test_show_parameters_and_info() -> None:
    session = ChatSession()
    assert "No parameters" in _say(session, "/show parameters")
    _say(session, "/set parameter temperature 0.2")
    assert "temperature  0.2" in _say(session, "/show parameters")
    assert isinstance(session.feed("/show info"), ShowInfo)
    assert "Usage" in _say(session, "/show everything")


def test_bad_flags_fail_before_the_session_starts() -> None:
    with pytest.raises(OptionsError):
        ChatSession(parameters={"top_p": 5.0})
