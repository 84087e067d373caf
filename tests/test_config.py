"""Config errors: one line naming file, section and key; status 2; no traceback."""
import logging

import pytest

from harness import run_script
from zmqami.config import ConfigError, load_broker_config

GOOD = """[general]
device_state = yes
presence = no
log_level = info
request_timeout = 1000
count_messages = no
verbose_messages = no

[servers]
sections = server-1, server-2

[server-1]
name = Console 1
addr = 127.0.0.1
cmd_port = 30967
evt_port = 30968
ami_trace = no

[server-2]
name = Console 2
addr = 127.0.0.1
cmd_port = 40967
evt_port = 40968
"""


def write(tmp_path, text):
    path = tmp_path / "config.ini"
    path.write_text(text)
    return str(path)


def test_every_key_of_the_original_is_read(tmp_path):
    config = load_broker_config(write(tmp_path, GOOD.replace("request_timeout = 1000",
                                                             "request_timeout = 250")))
    assert (config.device_state, config.presence, config.log_level) == (True, False, logging.INFO)
    assert config.request_timeout == 250 and not config.count_messages
    first, second = config.servers
    assert (first.name, first.cmd_url, first.evt_url, first.ami_trace) == (
        "Console 1", "tcp://127.0.0.1:30967", "tcp://127.0.0.1:30968", False)
    assert second.name == "Console 2"


def test_general_keys_have_defaults(tmp_path):
    text = GOOD.split("[servers]")[1]
    config = load_broker_config(write(tmp_path, "[servers]" + text))
    assert (config.device_state, config.presence, config.request_timeout) == (True, False, 1000)


@pytest.mark.parametrize("change, expected", [
    (("device_state = yes", "device_state = maybe"), "[general] device_state: 'maybe' is not yes or no"),
    (("request_timeout = 1000", "request_timeout = 1s"), "[general] request_timeout: '1s' is not a whole number"),
    (("log_level = info", "log_level = loud"), "[general] log_level: 'loud' is not one of debug, info, warning, error"),
    (("addr = 127.0.0.1\ncmd_port = 30967", "cmd_port = 30967"), "[server-1] addr: missing"),
    (("cmd_port = 40967", "cmd_port = 99999"), "[server-2] cmd_port: 99999 is not between 1 and 65535"),
    (("sections = server-1, server-2", "sections = server-1, server-3"), "[server-3]: section missing"),
    (("[servers]\nsections = server-1, server-2", ""), "[servers]: section missing"),
    (("name = Console 2", "name = Console 1"), "[server-2] name: 'Console 1' is used by another server"),
])
def test_errors_name_file_section_and_key(tmp_path, change, expected):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError) as error:
        load_broker_config(path)
    assert any(line.startswith(f"{path}: {expected}") for line in error.value.errors)


def test_log_level_is_looked_up_never_evaluated(tmp_path):
    path = write(tmp_path, GOOD.replace("log_level = info", "log_level = __import__('os')"))
    with pytest.raises(ConfigError):
        load_broker_config(path)


@pytest.mark.parametrize("text, expected", [
    (None, "cannot read the file"),
    ("not an ini file", "not a valid ini file"),
    (GOOD.replace("evt_port = 30968", "evt_port = x"), "[server-1] evt_port: 'x' is not a whole number"),
    (GOOD.replace("addr = 127.0.0.1\ncmd_port = 30967", "cmd_port = 30967"), "[server-1] addr: missing"),
    (GOOD.replace("presence = no", "presence = perhaps"), "[general] presence: 'perhaps' is not yes or no"),
    (GOOD.replace("log_level = info", "log_level = verbose"), "[general] log_level: 'verbose' is not one of"),
    (GOOD.split("[servers]")[0], "[servers]: section missing"),
])
def test_the_broker_prints_one_line_and_exits_with_status_2(tmp_path, text, expected):
    path = tmp_path / "config.ini"
    if text is not None:
        path.write_text(text)
    result = run_script("broker.py", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert str(path) in result.stderr and "Traceback" not in result.stderr


# --- a typo never passes ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    (("presence = no", "presense = yes"),
     "[general] presense: not a known key (did you mean presence?)"),
    (("log_level = info", "log_level = info\nping_intervall = 5"),
     "[general] ping_intervall: not a known key (did you mean ping_interval?)"),
    (("[servers]", "[generl]\nlog_level = debug\n\n[servers]"),
     "[generl]: not a known section (neither general, servers nor one listed in [servers] "
     "sections) (did you mean general?)"),
    (("ami_trace = no", "ami_trace = no\nami_prot = 5038"),
     "[server-1] ami_prot: not a known key (did you mean ami_port?)"),
    (("sections = server-1, server-2", "sections = server-1"),
     "[server-2]: a server section that [servers] sections does not list"),
])
@pytest.mark.parametrize("how", ["--check-config", "start"])
def test_an_unknown_key_or_section_is_an_error_at_check_and_start(tmp_path, change, expected,
                                                                   how):
    path = write(tmp_path, GOOD.replace(*change))
    result = run_script("broker.py", *(["--check-config"] if how == "--check-config" else []),
                        path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and f"{path}: {expected}" in result.stderr


@pytest.mark.parametrize("text, expected", [
    ("nats_urls = ['nats://127.0.0.1:4222']\n",
     "nats_urls: not a known setting (did you mean NATS_URLS?)"),
    ("Peer_Timeout = 3\n", "Peer_Timeout: not a known setting (did you mean PEER_TIMEOUT?)"),
    ("log_level = 'debug'\n", "log_level: not a known setting (did you mean LOG_LEVEL?)"),
    ("raise SystemExit(0)\n", "the settings file exits (sys.exit(0)) instead of setting values"),
    ("import sys\nsys.exit(3)\n", "the settings file exits (sys.exit(3))"),
])
@pytest.mark.parametrize("script", ["agent.py", "server.py"])
def test_a_settings_file_with_an_unknown_name_or_an_exit_is_an_error(tmp_path, text, expected,
                                                                     script):
    path = tmp_path / "settings.py"
    path.write_text(f"import os\n_mine = 1\n{text}")  # (modules and _names are allowed)
    if script == "server.py":  # (the hub's settings have no NATS_URLS or PEER_TIMEOUT)
        expected = expected.split(" (did you mean")[0] if "URLS" in expected or "PEER" in \
            expected else expected
    for args in (["--check-config", str(path)], [str(path)]):
        result = run_script(script, *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and f"{path}: {expected}" in result.stderr


def test_check_config_warns_of_a_secret_left_at_the_examples_placeholder():
    result = run_script("broker.py", "--check-config", "example_config.ini")
    assert result.returncode == 0
    assert "[server-1] ami_secret: warning: still the example's placeholder 'change-me'" \
        in result.stdout
    result = run_script("agent.py", "--check-config", "agent_config.py")
    assert "ASTERISK_AMI_SECRET: warning: still the example's placeholder" in result.stdout


def test_a_filter_that_is_not_a_regular_expression_is_a_config_error(tmp_path):
    from harness import run_script
    config = tmp_path / "config.ini"
    config.write_text("[servers]\nsections = a, b\n[a]\naddr = 127.0.0.1\nami_user = u\n"
                      "ami_secret = s\npublish_filter = ^PJSIP/(\n[b]\naddr = 127.0.0.1\n"
                      "ami_user = u\nami_secret = s\n")
    result = run_script("broker.py", "--check-config", str(config))
    assert result.returncode == 2 and result.stderr.startswith(
        f"{config}: [a] publish_filter: '^PJSIP/(' is not a regular expression")
    settings = tmp_path / "agent.py"
    settings.write_text("ACCEPT_FILTER = '[a-'\n")
    result = run_script("agent.py", "--check-config", str(settings))
    assert result.returncode == 2 and "ACCEPT_FILTER: '[a-' is not a regular expression" in \
        result.stderr
