"""The manual cannot drift from the code: every config snippet in docs/ passes --check-config,
every settings table lists exactly the settings the programs know, and every link leads
somewhere."""
import re

import pytest
import zmq.auth

from harness import ROOT, run_script
from zmqami.agent_settings import AGENT_SETTINGS
from zmqami.config import GENERAL_KEYS, SERVER_KEYS
from zmqami.hub import HUB_SETTINGS

DOCS = sorted((ROOT / "docs").glob("*.md"))
# A fenced block whose info string names one of our files is a snippet of that file.
CHECKED = {"config.ini": "broker.py", "agent_config.py": "agent.py",
           "server_config.py": "server.py"}
FENCE = re.compile(r"^```(\w+) ([\w.]+)\n(.*?)^```", re.M | re.S)


def snippets() -> list:
    return [pytest.param(name, text, id=f"{doc.name}-{number}-{name}") for doc in DOCS
            for number, (_, name, text) in enumerate(FENCE.findall(doc.read_text()))
            if name in CHECKED]


def complete_ini(text: str) -> str:
    """A config.ini snippet as a whole file: a fragment of server sections is given the
    [servers] list naming them (and a server, if it shows none)."""
    if re.search(r"^\[servers\]", text, re.M):
        return text
    servers = [s for s in re.findall(r"^\[([^\]]+)\]", text, re.M) if s != "general"]
    if not servers:
        text += "\n[server-1]\naddr = 127.0.0.1\nami_user = zmq-ami\nami_secret = s3cret\n"
        servers = ["server-1"]
    return text + f"\n[servers]\nsections = {', '.join(servers)}\n"


def test_the_docs_have_snippets_of_every_config_file():
    assert {param.values[0] for param in snippets()} == set(CHECKED)


def with_its_files(text: str, folder) -> str:
    """The snippet with the files it names under /etc/zmq-ami/ made in folder, as an
    administrator would have made them (key pairs with zmq.auth, a folder of clients' keys)."""
    for name in set(re.findall(r"/etc/zmq-ami/([\w.]+)", text)):
        stem, _, kind = name.partition(".")
        if kind in ("key", "key_secret"):
            zmq.auth.create_certificates(str(folder), stem)
            (folder / f"{stem}.key_secret").chmod(0o600)
        elif not kind:
            (folder / name).mkdir(exist_ok=True)
    return text.replace("/etc/zmq-ami/", f"{folder}/")


@pytest.mark.parametrize("name, text", snippets())
def test_every_config_snippet_passes_check_config(tmp_path, name, text):
    path = tmp_path / name
    text = with_its_files(text, tmp_path)
    path.write_text(complete_ini(text) if name == "config.ini" else text)
    result = run_script(CHECKED[name], "--check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def table_names(doc: str, heading: str) -> set:
    """The backquoted names in the first column (config.ini's: the second) of the first table
    from heading on."""
    lines = (ROOT / "docs" / doc).read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    names = set()
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = line.split("|")
        names.update(re.findall(r"`(\w+)`", cells[2] if doc == "broker.md" else cells[1]))
    return names


@pytest.mark.parametrize("doc, heading, known", [
    ("broker.md", "| section | key |", set(GENERAL_KEYS + SERVER_KEYS + ("sections",))),
    ("agents.md", "## agent_config.py", set(AGENT_SETTINGS)),
    ("agents.md", "## server_config.py", set(HUB_SETTINGS))])
def test_each_settings_table_lists_exactly_the_known_settings(doc, heading, known):
    assert table_names(doc, heading) == known


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [ROOT / "README.md"] + DOCS, ids=lambda page: page.name)
def test_every_link_leads_to_a_file_and_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"
