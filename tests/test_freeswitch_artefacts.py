"""FreeSWITCH artefacts (``freeswitch-conf/``, ``dialplan/``, ``Dockerfile.fs``) hold together.

No FreeSWITCH runs here, so these tests rebuild ``/etc/freeswitch`` from the ``COPY``
instructions of ``Dockerfile.fs``, assemble it the way FreeSWITCH's XML preprocessor does
(``src/switch_xml.c``: ``preprocess()``, ``expand_vars()``), parse the result and resolve every
cross-reference with generic resolvers: ``$${variables}``, network lists (ACLs), dialplan
contexts, gateways, socket targets, applications -> modules -> packages, environment variables
-> entrypoint checks. The mutation tests at the end break each kind of reference in a copy of
the tree and check that the matching resolver reports it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import ipaddress
import posixpath
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from iim.core.numbering import NumberingPlan, PlanError, try_e164
from iim.settings import FreeSwitchNode, Settings

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = "/etc/freeswitch"

# Globals FreeSWITCH sets before it reads freeswitch.xml (switch_core.c, switch_core_init()).
# Values are the Debian package layout; only the names matter to the resolvers.
BUILTIN_GLOBALS: Mapping[str, str] = {
    "hostname": "fs1",
    "local_ip_v4": "10.20.30.40",
    "local_mask_v4": "255.255.255.0",
    "local_ip_v6": "::1",
    "switch_serial": "0",
    "base_dir": "/usr",
    "recordings_dir": "/var/lib/freeswitch/recordings",
    "sound_prefix": "/usr/share/freeswitch/sounds",
    "sounds_dir": "/usr/share/freeswitch/sounds",
    "conf_dir": CONF_DIR,
    "log_dir": "/var/log/freeswitch",
    "run_dir": "/run/freeswitch",
    "db_dir": "/var/lib/freeswitch/db",
    "mod_dir": "/usr/lib/freeswitch/mod",
    "htdocs_dir": "/usr/share/freeswitch/htdocs",
    "script_dir": "/usr/share/freeswitch/scripts",
    "temp_dir": "/tmp",
    "grammar_dir": "/usr/share/freeswitch/grammar",
    "fonts_dir": "/usr/share/freeswitch/fonts",
    "images_dir": "/var/lib/freeswitch/images",
    "certs_dir": "/etc/freeswitch/tls",
    "storage_dir": "/var/lib/freeswitch/storage",
    "cache_dir": "/var/cache/freeswitch",
    "core_uuid": "00000000-0000-0000-0000-000000000000",
}

# Network lists FreeSWITCH computes at start; they need no acl.conf.xml entry.
BUILTIN_ACLS = frozenset(
    {
        "rfc1918.auto",
        "nat.auto",
        "localnet.auto",
        "loopback.auto",
        "wan.auto",
        "wan_v4.auto",
        "wan_v6.auto",
        "any_v4.auto",
        "any_v6.auto",
    }
)

# Parameters whose value names network lists (sofia profiles, event socket, directory).
ACL_PARAMS = frozenset(
    {
        "apply-inbound-acl",
        "apply-register-acl",
        "apply-proxy-acl",
        "apply-candidate-acl",
        "apply-nat-acl",
        "local-network-acl",
        "auth-acl",
    }
)

# Which module provides each dialplan application this configuration uses. An application
# missing here fails test_every_application_has_its_module_loaded: add it deliberately.
APP_MODULE: Mapping[str, str] = {
    "socket": "mod_event_socket",
    "set": "mod_dptools",
    "export": "mod_dptools",
    "bridge": "mod_dptools",
    "hangup": "mod_dptools",
    "respond": "mod_dptools",
    "log": "mod_dptools",
    "limit": "mod_dptools",
    "transfer": "mod_dptools",
    "execute_extension": "mod_dptools",
    "answer": "mod_dptools",
    "playback": "mod_dptools",
    "sleep": "mod_dptools",
}
LIMIT_BACKEND_MODULE: Mapping[str, str] = {"hash": "mod_hash", "db": "mod_db"}
# Configuration files that only mean something with their module loaded.
CONFIG_MODULE: Mapping[str, str] = {
    "sofia.conf": "mod_sofia",
    "event_socket.conf": "mod_event_socket",
    "logfile.conf": "mod_logfile",
}
# What a device (speaker) context must never do: reach anything but IIM.
FORBIDDEN_DEVICE_APPS = frozenset(
    {"bridge", "originate", "transfer", "execute_extension", "redirect", "deflect", "enterprise_originate"}
)

_DIRECTIVE = re.compile(r'<X-PRE-PROCESS\s+cmd="(?P<cmd>[^"]*)"\s+data="(?P<data>[^"]*)"\s*/>', re.IGNORECASE)
_VAR_REF = re.compile(r"\$\$\{([^}]*)\}")
_GATEWAY_REF = re.compile(r"sofia/gateway/([^/]+)/")
_PROFILE_REF = re.compile(r"(?:sofia/|sofia_contact\((?:\*/)?)([A-Za-z0-9_.-]+)/")


# --------------------------------------------------------------------------- Dockerfile


@dataclasses.dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined (comments and blank lines dropped)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1] if continued else stripped)
        if not continued:
            text = " ".join(part for part in pending if part)
            keyword, _, args = text.partition(" ")
            instructions.append(Instruction(start, keyword.upper(), args.strip()))
            pending = []
    return instructions


def copy_sources(instruction: Instruction) -> tuple[list[str], str] | None:
    """``(sources, destination)`` of a ``COPY`` from the build context, else None."""
    if instruction.keyword != "COPY":
        return None
    words = instruction.args.split()
    if any(word.startswith("--from") for word in words):
        return None
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1], paths[-1]


def image_tree(root: Path, instructions: list[Instruction]) -> tuple[dict[str, Path], list[str]]:
    """Image path -> repository file for every file the Dockerfile copies; problems found."""
    tree: dict[str, Path] = {}
    problems: list[str] = []
    for instruction in instructions:
        copy = copy_sources(instruction)
        if copy is None:
            continue
        sources, destination = copy
        for source in sources:
            path = root / source
            if not path.exists():
                problems.append(f"Dockerfile.fs:{instruction.line}: COPY source {source!r} does not exist")
            elif path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    relative = file.relative_to(path).as_posix()
                    tree[posixpath.join(destination, relative)] = file
            elif destination.endswith("/") or len(sources) > 1:
                tree[posixpath.join(destination, path.name)] = path
            else:
                tree[destination] = path
    return tree, problems


# --------------------------------------------------------------------------- preprocessor


@dataclasses.dataclass
class Assembly:
    """freeswitch.xml after preprocessing, as FreeSWITCH would hand it to its XML parser."""

    xml: str
    variables: dict[str, str]
    env_reads: dict[str, str]  # global variable -> environment variable (env-set)
    exec_sets: set[str]  # global variables given a value by a command (exec-set)
    problems: list[str]
    files: list[str]  # image paths read, in order


def assemble(tree: Mapping[str, Path], environ: Mapping[str, str]) -> Assembly:
    """Emulate ``preprocess()``: line by line, ``$${var}`` expanded first, then the directives.

    Faithful to the parts that matter here: lines containing ``<include>``, ``</include>`` or
    ``<?`` are dropped; a line naming the directive without ``<`` before it is dropped; the
    directives are found on any line (also inside XML comments); includes are globs relative
    to the directory of the including file, expanded in sorted order.
    """
    asm = Assembly(
        xml="", variables=dict(BUILTIN_GLOBALS), env_reads={}, exec_sets=set(), problems=[], files=[]
    )
    out: list[str] = []

    def expand(line: str, where: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in asm.variables:
                asm.problems.append(f"{where}: $${{{name}}} is used but never defined")
                return ""
            return asm.variables[name]

        return _VAR_REF.sub(value, line)

    def include(pattern: str, cwd: str, where: str, depth: int) -> None:
        full = posixpath.normpath(pattern if pattern.startswith("/") else posixpath.join(cwd, pattern))
        folder, name = posixpath.split(full)
        matches = sorted(
            p for p in tree if posixpath.dirname(p) == folder and fnmatch.fnmatch(posixpath.basename(p), name)
        )
        if not matches:
            asm.problems.append(f"{where}: include {pattern!r} matches no file in the image")
        for match in matches:
            process(match, depth + 1)

    def directive(cmd: str, data: str, path: str, where: str, depth: int) -> None:
        name, sep, rest = data.partition("=")
        name, rest = name.strip(), rest.strip()
        if cmd == "set" and sep:
            asm.variables[name] = rest
        elif cmd == "env-set" and sep and rest.startswith("$"):
            asm.env_reads[name] = rest[1:]
            if rest[1:] in environ:
                asm.variables[name] = environ[rest[1:]]
        elif cmd == "exec-set" and sep:
            asm.exec_sets.add(name)
            asm.variables[name] = f"exec-set-{name}"
        elif cmd == "include":
            include(data, posixpath.dirname(path), where, depth)
        else:
            asm.problems.append(f"{where}: unsupported directive cmd={cmd!r} data={data!r}")

    def process(path: str, depth: int) -> None:
        if depth > 100:
            asm.problems.append(f"{path}: include recursion deeper than FreeSWITCH allows")
            return
        asm.files.append(path)
        for number, raw in enumerate(tree[path].read_text().splitlines(keepends=True), start=1):
            where = f"{path}:{number}"
            line = expand(raw, where)
            if "<include>" in raw or "</include>" in raw or "<?" in raw:
                continue
            at = line.lower().find("x-pre-process")
            if at >= 0:
                match = _DIRECTIVE.search(line)
                if at > 0 and line[at - 1] == "<" and match:
                    directive(match["cmd"].lower(), match["data"], path, where, depth)
                continue
            if "<!--#" in line:
                asm.problems.append(f"{where}: '<!--#' comments are preprocessor commands")
            out.append(line)

    top = posixpath.join(CONF_DIR, "freeswitch.xml")
    if top in tree:
        process(top, 0)
    else:
        asm.problems.append(f"{top} is not in the image")
    asm.xml = "".join(out)
    return asm


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class Model:
    root: Path
    instructions: list[Instruction]
    tree: dict[str, Path]
    copy_problems: list[str]
    asm: Assembly
    doc: ET.Element | None
    parse_error: str


@functools.cache
def load(root: Path, environ: tuple[tuple[str, str], ...] = ()) -> Model:
    instructions = parse_dockerfile(root / "Dockerfile.fs")
    tree, copy_problems = image_tree(root, instructions)
    asm = assemble(tree, dict(environ))
    try:
        doc: ET.Element | None = ET.fromstring(asm.xml)
        error = ""
    except ET.ParseError as exc:
        doc, error = None, str(exc)
    return Model(root, instructions, tree, copy_problems, asm, doc, error)


def document(model: Model) -> ET.Element:
    assert model.doc is not None, f"assembled freeswitch.xml does not parse: {model.parse_error}"
    return model.doc


def configuration(doc: ET.Element, name: str) -> ET.Element:
    found = doc.find(f"./section[@name='configuration']/configuration[@name='{name}']")
    assert found is not None, f"configuration {name!r} is missing"
    return found


def settings(element: ET.Element, path: str = "settings") -> list[tuple[str, str]]:
    return [(p.get("name", ""), p.get("value", "")) for p in element.findall(f"{path}/param")]


def setting(element: ET.Element, name: str, path: str = "settings") -> str | None:
    values = [value for key, value in settings(element, path) if key == name]
    return values[-1] if values else None


def profiles(doc: ET.Element) -> list[ET.Element]:
    return doc.findall("./section[@name='configuration']/configuration[@name='sofia.conf']/profiles/profile")


def gateways(doc: ET.Element) -> dict[str, ET.Element]:
    return {gw.get("name", ""): gw for profile in profiles(doc) for gw in profile.findall("gateways/gateway")}


def contexts(doc: ET.Element) -> list[ET.Element]:
    return doc.findall("./section[@name='dialplan']/context")


def actions(extension: ET.Element) -> list[ET.Element]:
    return [e for e in extension.iter() if e.tag in ("action", "anti-action")]


def all_actions(doc: ET.Element) -> Iterator[tuple[str, str, ET.Element]]:
    for context in contexts(doc):
        for extension in context.findall("extension"):
            for action in actions(extension):
                yield context.get("name", ""), extension.get("name", ""), action


def device_profiles(doc: ET.Element) -> list[ET.Element]:
    """Profiles that face devices rather than the core: the ones without gateways."""
    return [p for p in profiles(doc) if not p.findall("gateways/gateway")]


def device_contexts(doc: ET.Element) -> set[str]:
    names = {setting(p, "context") or "default" for p in device_profiles(doc)}
    names |= {v.get("value", "") for v in doc.iter("variable") if v.get("name") == "user_context"}
    return names


def core_contexts(doc: ET.Element) -> set[str]:
    return {setting(p, "context") or "default" for p in profiles(doc) if p.findall("gateways/gateway")}


def set_value(action: ET.Element, variable: str) -> str | None:
    if action.get("application") != "set":
        return None
    name, _, value = action.get("data", "").partition("=")
    return value if name == variable else None


def socket_target(data: str) -> tuple[str, int, set[str]]:
    target, *flags = data.split()
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else -1, set(flags)


def entrypoint_checked_env(root: Path) -> set[str]:
    text = (root / "freeswitch-conf" / "docker-entrypoint.sh").read_text()
    return set(re.findall(r"^\s*check (IIM_FS_[A-Z0-9_]+) ", text, re.MULTILINE))


def modules_loaded(doc: ET.Element) -> list[str]:
    return [m.get("module", "") for m in configuration(doc, "modules.conf").findall("modules/load")]


def dockerfile_packages(model: Model) -> set[str]:
    text = " ".join(i.args for i in model.instructions if i.keyword == "RUN")
    return set(re.findall(r"\bfreeswitch-mod-[a-z0-9-]+\b", text))


# --------------------------------------------------------------------------- resolvers
# Each returns a list of problems; an empty list means every reference resolves.


def check_dockerfile(root: Path) -> list[str]:
    model = load(root)
    problems = list(model.copy_problems)
    keywords = [i.keyword for i in model.instructions]
    users = [i.args for i in model.instructions if i.keyword == "USER"]
    if not users or users[-1] in ("root", "0") or users[-1].startswith("0:"):
        problems.append("the image must switch to a non-root USER")
    elif max(n for n, k in enumerate(keywords) if k == "USER") > min(
        n for n, k in enumerate(keywords) if k in ("ENTRYPOINT", "CMD")
    ):
        problems.append("USER must come before ENTRYPOINT/CMD")
    health = [i.args for i in model.instructions if i.keyword == "HEALTHCHECK"]
    if not health or not all(s in health[-1] for s in ("fs_cli", "-x status", "IIM_FS_PASSWORD", "-P 8021")):
        problems.append("HEALTHCHECK must run 'fs_cli -x status' on 8021 with IIM_FS_PASSWORD")
    exposed = " ".join(i.args for i in model.instructions if i.keyword == "EXPOSE")
    if re.search(r"\b8021\b", exposed):
        problems.append("the Event Socket port 8021 is loopback-only and must not be EXPOSEd")
    if any(i.keyword == "ARG" and "TOKEN" in i.args.upper() for i in model.instructions):
        problems.append("the SignalWire token must be a BuildKit secret, not a build ARG")
    if f"{CONF_DIR}/freeswitch.xml" not in model.tree:
        problems.append("nothing copies freeswitch.xml into /etc/freeswitch")
    entry = [i.args for i in model.instructions if i.keyword == "ENTRYPOINT"]
    copied = [c[1] for c in map(copy_sources, model.instructions) if c is not None]
    if not entry or not any(dest in entry[-1] for dest in copied):
        problems.append("ENTRYPOINT must run the entrypoint script the Dockerfile copies")
    if model.doc is not None:
        for profile in profiles(model.doc):
            ports = [setting(profile, "sip-port")]
            wss = setting(profile, "wss-binding")
            ports.append(wss.rpartition(":")[2] if wss else None)
            for port in filter(None, ports):
                if not re.search(rf"\b{port}/(tcp|udp)\b", exposed):
                    problems.append(
                        f"profile {profile.get('name')} listens on {port} but Dockerfile.fs does not EXPOSE it"
                    )
        switch = configuration(model.doc, "switch.conf")
        rtp = f"{setting(switch, 'rtp-start-port')}-{setting(switch, 'rtp-end-port')}/udp"
        if rtp not in exposed:
            problems.append(f"RTP range {rtp} of switch.conf.xml is not EXPOSEd")
    return problems


def check_variables(root: Path) -> list[str]:
    model = load(root)
    problems = list(model.asm.problems)
    if model.doc is None:
        problems.append(f"assembled configuration does not parse: {model.parse_error}")
    return problems


def check_preprocessor_hazards(root: Path) -> list[str]:
    """What FreeSWITCH's preprocessor does differently from an XML parser."""
    problems: list[str] = []
    model = load(root)
    for image_path, file in sorted(model.tree.items()):
        if not image_path.endswith(".xml"):
            continue
        text = file.read_text()
        try:
            parsed = ET.fromstring(text)
        except ET.ParseError as exc:
            problems.append(f"{image_path}: not well-formed XML: {exc}")
            continue
        elements = sum(1 for e in parsed.iter() if str(e.tag).upper() == "X-PRE-PROCESS")
        written = len(re.findall(r"<X-PRE-PROCESS\b", text, re.IGNORECASE))
        if written != elements:
            problems.append(
                f"{image_path}: a directive inside an XML comment still runs ({written} vs {elements})"
            )
        for number, line in enumerate(text.splitlines(), start=1):
            lowered = line.lower()
            at = lowered.find("x-pre-process")
            if at >= 0 and (at == 0 or line[at - 1] != "<"):
                problems.append(f"{image_path}:{number}: the preprocessor drops a line naming the directive")
            for marker in ("<include>", "</include>"):
                if marker in line and line.strip() != marker:
                    problems.append(
                        f"{image_path}:{number}: text beside {marker} is dropped by the preprocessor"
                    )
            if "<?" in line and not re.fullmatch(r"\s*<\?xml[^>]*\?>\s*", line):
                problems.append(f"{image_path}:{number}: the preprocessor drops lines containing '<?'")
            if "<!--#" in line:
                problems.append(f"{image_path}:{number}: '<!--#' is a preprocessor command")
    return problems


def check_acls(root: Path) -> list[str]:
    doc = document(load(root))
    problems: list[str] = []
    defined: dict[str, ET.Element] = {}
    for network_list in configuration(doc, "acl.conf").findall("network-lists/list"):
        name = network_list.get("name", "")
        if name in defined or name in BUILTIN_ACLS:
            problems.append(f"network list {name!r} is defined twice or shadows a built-in list")
        defined[name] = network_list
        if network_list.get("default") not in ("allow", "deny"):
            problems.append(f"network list {name!r}: default must be allow or deny")
        for node in network_list.findall("node"):
            if node.get("type") not in ("allow", "deny"):
                problems.append(f"network list {name!r}: node type must be allow or deny")
            for cidr in filter(None, (node.get("cidr") or "").split(",")):
                try:
                    ipaddress.ip_network(cidr.strip(), strict=False)
                except ValueError:
                    problems.append(f"network list {name!r}: {cidr!r} is not a network")
    used: set[str] = set()
    for param in doc.iter("param"):
        if param.get("name") in ACL_PARAMS:
            for acl in filter(None, (param.get("value") or "").split(",")):
                used.add(acl.strip())
                if acl.strip() not in defined and acl.strip() not in BUILTIN_ACLS:
                    problems.append(f"{param.get('name')}={acl!r} names no network list")
    problems += [
        f"network list {name!r} is defined but never applied" for name in sorted(set(defined) - used)
    ]
    return problems


def check_contexts(root: Path) -> list[str]:
    doc = document(load(root))
    problems: list[str] = []
    names = [c.get("name", "") for c in contexts(doc)]
    problems += [
        f"context {n!r} is defined more than once" for n in sorted({n for n in names if names.count(n) > 1})
    ]
    for profile in profiles(doc):
        context = setting(profile, "context") or "default"
        if context not in names:
            problems.append(f"profile {profile.get('name')!r} sends calls to missing context {context!r}")
    for variable in doc.iter("variable"):
        if variable.get("name") == "user_context" and variable.get("value") not in names:
            problems.append(f"directory user_context {variable.get('value')!r} is not a context")
    for context, extension, action in all_actions(doc):
        if action.get("application") in ("transfer", "execute_extension"):
            words = action.get("data", "").split()
            if len(words) >= 3 and words[1] == "XML" and words[2] not in names:
                problems.append(
                    f"{context}/{extension}: {action.get('application')} to missing context {words[2]!r}"
                )
    return problems


def check_gateways(root: Path) -> list[str]:
    """Gateways and sofia profiles named in endpoints (dialplan, directory, IIM's default) exist."""
    doc = document(load(root))
    defined = gateways(doc)
    profile_names = {p.get("name", "") for p in profiles(doc)}
    problems: list[str] = []
    references = [(f"{c}/{e}", a.get("data", "")) for c, e, a in all_actions(doc)]
    references += [(f"param {p.get('name')}", p.get("value", "")) for p in doc.iter("param")]
    references.append(("IIM passthrough_endpoint default", Settings().passthrough_endpoint))
    for where, data in references:
        problems += [
            f"{where}: gateway {gw!r} is not defined"
            for gw in _GATEWAY_REF.findall(data)
            if gw not in defined
        ]
        problems += [
            f"{where}: sofia profile {name!r} is not defined"
            for name in _PROFILE_REF.findall(data)
            if name not in profile_names | {"gateway"}
        ]
    for name, gateway in defined.items():
        if (setting(gateway, "register", ".") or "true").lower() != "false":
            problems.append(f"gateway {name!r} must not register to the core (peering by address)")
        if not setting(gateway, "proxy", "."):
            problems.append(f"gateway {name!r} has no proxy")
    return problems


def check_sockets(root: Path) -> list[str]:
    doc = document(load(root))
    problems: list[str] = []
    for context in contexts(doc):
        for extension in context.findall("extension"):
            where = f"{context.get('name')}/{extension.get('name')}"
            resume = False
            for action in actions(extension):
                resume = resume or set_value(action, "socket_resume") == "true"
                if action.get("application") != "socket":
                    continue
                host, port, flags = socket_target(action.get("data", ""))
                if not host or not 0 < port < 65536:
                    problems.append(f"{where}: socket target {action.get('data')!r} is not host:port")
                if not {"async", "full"} <= flags:
                    problems.append(
                        f"{where}: socket needs 'async full' (events and api on the outbound socket)"
                    )
                if not resume:
                    problems.append(
                        f"{where}: socket_resume=true must be set before socket, or a dead IIM drops the call"
                    )
    return problems


def check_esl(root: Path) -> list[str]:
    model = load(root)
    doc = document(model)
    esl = configuration(doc, "event_socket.conf")
    problems: list[str] = []
    listen = setting(esl, "listen-ip") or ""
    try:
        loopback = ipaddress.ip_address(listen).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        problems.append(f"Event Socket listens on {listen!r}, not loopback")
    if setting(esl, "listen-port") != str(FreeSwitchNode().port):
        problems.append(
            f"Event Socket port {setting(esl, 'listen-port')} is not IIM's default {FreeSwitchNode().port}"
        )
    password = setting(esl, "password") or ""
    if password.lower() == "cluecon" or not password:
        problems.append("Event Socket password is empty or the public default")
    raw = model.tree[f"{CONF_DIR}/autoload_configs/event_socket.conf.xml"].read_text()
    refs = re.findall(r'name="password"\s+value="\$\$\{([^}]+)\}"', raw)
    if len(refs) != 1 or refs[0] not in model.asm.env_reads or refs[0] not in model.asm.exec_sets:
        problems.append(
            "the password must be a variable read from the environment with a random exec-set default"
        )
    acls = [value for key, value in settings(esl) if key == "apply-inbound-acl"]
    if len(acls) != 1:
        problems.append("Event Socket needs exactly one apply-inbound-acl")
    for acl in acls:
        lists = configuration(doc, "acl.conf").findall(f"network-lists/list[@name='{acl}']")
        for network_list in lists:
            if network_list.get("default") != "deny":
                problems.append(f"network list {acl!r} must default to deny")
            for node in network_list.findall("node[@type='allow']"):
                for cidr in (node.get("cidr") or "").split(","):
                    if not ipaddress.ip_network(cidr.strip(), strict=False).is_loopback:
                        problems.append(f"network list {acl!r} lets {cidr!r} reach the Event Socket")
    return problems


def check_speaker_isolation(root: Path) -> list[str]:
    """Devices reach only IIM: no bridge, no transfer, no gateway from their contexts."""
    doc = document(load(root))
    problems: list[str] = []
    core_profiles = [p.get("name", "") for p in profiles(doc) if p.findall("gateways/gateway")]
    forbidden_data = ["sofia/gateway/", "loopback/", *(f"sofia/{name}/" for name in core_profiles)]
    device = device_contexts(doc)
    if device & core_contexts(doc):
        problems.append(f"devices and the core share context(s) {sorted(device & core_contexts(doc))}")
    for context, extension, action in all_actions(doc):
        if context not in device:
            continue
        app, data = action.get("application", ""), action.get("data", "")
        if app in FORBIDDEN_DEVICE_APPS or any(marker in data for marker in forbidden_data):
            problems.append(f"{context}/{extension}: {app} {data!r} lets a device call out by itself")
    for profile in device_profiles(doc):
        name = profile.get("name")
        if setting(profile, "auth-calls") != "true":
            problems.append(f"profile {name!r}: devices must authenticate their calls (auth-calls)")
        for param in ("apply-inbound-acl", "apply-register-acl"):
            if setting(profile, param):
                problems.append(
                    f"profile {name!r}: {param} lets matching addresses skip digest authentication"
                )
        for param in ("accept-blind-reg", "accept-blind-auth"):
            if (setting(profile, param) or "false") != "false":
                problems.append(f"profile {name!r}: {param} must be false")
        if setting(profile, "disable-transfer") != "true":
            problems.append(f"profile {name!r}: REFER would let a device move the far end of a call")
    return problems


def check_subscriber_fallback(root: Path) -> list[str]:
    """Core calls handed to IIM fall back to a plain bridge through a defined gateway."""
    doc = document(load(root))
    problems: list[str] = []
    handed = 0
    for context in contexts(doc):
        if context.get("name") not in core_contexts(doc):
            continue
        for extension in context.findall("extension"):
            steps = actions(extension)
            sockets = [n for n, a in enumerate(steps) if a.get("application") == "socket"]
            if not sockets:
                continue
            handed += 1
            where = f"{context.get('name')}/{extension.get('name')}"
            if not any(set_value(a, "hangup_after_bridge") == "true" for a in steps[: sockets[0]]):
                problems.append(
                    f"{where}: hangup_after_bridge=true must be set before handing the call to IIM"
                )
            if not any(set_value(a, "continue_on_fail") == "true" for a in steps[: sockets[0]]):
                problems.append(
                    f"{where}: continue_on_fail=true lets IIM try its next target after a failure"
                )
            after = steps[sockets[-1] + 1 :]
            bridges = [n for n, a in enumerate(after) if a.get("application") == "bridge"]
            if not bridges:
                problems.append(
                    f"{where}: no fallback bridge after the socket: the call drops when IIM is down"
                )
                continue
            data = after[bridges[0]].get("data", "")
            gateway = _GATEWAY_REF.findall(data)
            if not gateway or gateway[0] not in gateways(doc) or "${destination_number}" not in data:
                problems.append(
                    f"{where}: fallback must bridge ${{destination_number}} through a defined gateway"
                )
            last = [v for a in after[: bridges[0]] if (v := set_value(a, "continue_on_fail")) is not None]
            if last[-1:] != ["false"]:
                problems.append(
                    f"{where}: continue_on_fail=false before the fallback returns the callee's cause"
                )
    if not handed:
        problems.append("no context reached from the core hands calls to IIM")
    return problems


def check_modules(root: Path) -> list[str]:
    model = load(root)
    doc = document(model)
    loaded = modules_loaded(doc)
    problems = [f"module {m} is loaded twice" for m in sorted({m for m in loaded if loaded.count(m) > 1})]
    needed: dict[str, str] = {"mod_dialplan_xml": "XML dialplan"}
    for context, extension, action in all_actions(doc):
        app = action.get("application", "")
        if app not in APP_MODULE:
            problems.append(f"{context}/{extension}: application {app!r} has no module in APP_MODULE")
            continue
        needed[APP_MODULE[app]] = f"application {app}"
        if app == "limit":
            backend = action.get("data", "").split()[0]
            needed[LIMIT_BACKEND_MODULE.get(backend, f"unknown limit backend {backend}")] = "limit backend"
    for name, module in CONFIG_MODULE.items():
        if doc.find(f"./section[@name='configuration']/configuration[@name='{name}']") is not None:
            needed[module] = name
    problems += [
        f"{why} needs {module}, which modules.conf.xml does not load"
        for module, why in needed.items()
        if module not in loaded
    ]
    packages = dockerfile_packages(model)
    wanted = {"freeswitch-" + m.replace("_", "-") for m in loaded}
    problems += [f"Dockerfile.fs does not install {p}" for p in sorted(wanted - packages)]
    problems += [
        f"Dockerfile.fs installs {p}, which no loaded module needs" for p in sorted(packages - wanted)
    ]
    return problems


def check_env_contract(root: Path) -> list[str]:
    """Every environment variable vars.xml reads is vetted by the entrypoint and documented."""
    model = load(root)
    read = set(model.asm.env_reads.values())
    checked = entrypoint_checked_env(root)
    readme = (root / "freeswitch-conf" / "README.md").read_text()
    problems = [
        f"{v} is read by vars.xml but the entrypoint does not check it" for v in sorted(read - checked)
    ]
    problems += [f"the entrypoint checks {v}, which vars.xml never reads" for v in sorted(checked - read)]
    problems += [
        f"{v} is not documented in freeswitch-conf/README.md" for v in sorted(read) if v not in readme
    ]
    return problems


def check_iim_consistency(root: Path) -> list[str]:
    """The FreeSWITCH side points at what IIM listens on by default."""
    model = load(root)
    doc = document(model)
    problems: list[str] = []
    primary = model.asm.variables.get("iim_primary", "")
    _host, port, _ = socket_target(primary)
    if port != Settings().esl_port:
        problems.append(f"iim_primary {primary!r} is not IIM's outbound port {Settings().esl_port}")
    targets = {model.asm.variables.get("iim_primary"), model.asm.variables.get("iim_secondary")}
    for context, extension, action in all_actions(doc):
        if action.get("application") == "socket" and action.get("data", "").split()[0] not in targets:
            problems.append(f"{context}/{extension}: socket target is not iim_primary or iim_secondary")
    return problems


CHECKS: Mapping[str, Callable[[Path], list[str]]] = {
    "dockerfile": check_dockerfile,
    "variables": check_variables,
    "preprocessor_hazards": check_preprocessor_hazards,
    "acls": check_acls,
    "contexts": check_contexts,
    "gateways": check_gateways,
    "sockets": check_sockets,
    "esl": check_esl,
    "speaker_isolation": check_speaker_isolation,
    "subscriber_fallback": check_subscriber_fallback,
    "modules": check_modules,
    "env_contract": check_env_contract,
    "iim_consistency": check_iim_consistency,
}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_every_reference_resolves(name: str) -> None:
    assert CHECKS[name](ROOT) == []


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in ("freeswitch-conf", "dialplan") for p in (ROOT / folder).rglob("*.xml")),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_each_xml_file_parses(path: Path) -> None:
    ET.parse(path)


def test_libxml2_accepts_every_file() -> None:
    """xmllint's parser (libxml2, through lxml from PyPI: no apt package) as a second opinion to expat's."""
    from lxml import etree

    files = sorted(p for folder in ("freeswitch-conf", "dialplan") for p in (ROOT / folder).rglob("*.xml"))
    assert files
    errors = []
    for path in files:
        try:
            etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError as exc:
            errors.append(f"{path.relative_to(ROOT)}: {exc}")
    assert errors == []


def test_every_repository_xml_file_reaches_the_image() -> None:
    model = load(ROOT)
    copied = set(model.tree.values())
    missing = [
        p
        for folder in ("freeswitch-conf", "dialplan")
        for p in (ROOT / folder).rglob("*.xml")
        if p not in copied
    ]
    assert missing == []
    unread = sorted(p for p in model.tree if p.endswith(".xml") and p not in model.asm.files)
    assert unread == [], "files copied into /etc/freeswitch but never included"


def test_assembled_document_has_the_sections_freeswitch_reads() -> None:
    doc = document(load(ROOT))
    assert doc.tag == "document"
    assert {s.get("name") for s in doc.findall("section")} == {"configuration", "dialplan", "directory"}
    names = {c.get("name") for c in doc.findall("./section[@name='configuration']/configuration")}
    assert {"modules.conf", "switch.conf", "event_socket.conf", "acl.conf", "sofia.conf"} <= names
    assert {p.get("name") for p in profiles(doc)} == {"internal", "external"}


def test_subscriber_regex_accepts_numbers_and_refuses_the_rest() -> None:
    model = load(ROOT)
    expressions = [
        c.get("expression", "")
        for context in contexts(document(model))
        if context.get("name") in core_contexts(document(model))
        for extension in context.findall("extension")
        if any(a.get("application") == "socket" for a in actions(extension))
        for c in extension.findall("condition")
        if c.get("field") == "destination_number"
    ]
    assert expressions == [model.asm.variables["iim_subscriber_regex"]]
    pattern = re.compile(expressions[0])
    for number in ("+79161234567", "79161234567", "89161234567", "4915112345678", "+12025550123",
                   "0079161234567", "81079161234567", "02079460018", "00114412345678901234"[:19]):
        match = pattern.search(number)
        assert match is not None, number
        assert match.group(1) == number
    for bad in ("", "1000", "+0123456789", "*21#", "79161234567890123456", "+7916123456789012", "sip:7916@evil",
                "iim", "8 900 1234567", "+7 900"):
        assert pattern.search(bad) is None, bad


@functools.cache
def _subscriber_pattern() -> re.Pattern[str]:
    return re.compile(load(ROOT).asm.variables["iim_subscriber_regex"])


_PLANS = st.builds(
    NumberingPlan,
    country_code=st.from_regex(r"[1-9][0-9]{0,2}", fullmatch=True),
    trunk_prefix=st.from_regex(r"[0-9]{0,2}", fullmatch=True),
    international_prefixes=st.lists(st.from_regex(r"[0-9]{2,4}", fullmatch=True), min_size=1, max_size=3,
                                    unique=True).map(tuple),
    national_lengths=st.lists(st.integers(6, 12), min_size=1, max_size=4, unique=True).map(tuple),
).filter(lambda p: max(p.national_lengths) <= 15 - len(p.country_code)
         and p.trunk_prefix not in p.international_prefixes)


@given(data=st.data())
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
def test_the_subscriber_regex_admits_every_form_any_numbering_plan_reads(data: st.DataObject) -> None:
    """Issue 15 item 4: whatever plan a tenant sets, the dialplan hands its national and international forms to
    IIM (which reads them under that plan) rather than refusing them before IIM sees them."""
    try:
        plan = data.draw(_PLANS)
    except PlanError:
        return
    length = data.draw(st.sampled_from(plan.national_lengths))
    nsn = data.draw(st.from_regex(rf"[1-9][0-9]{{{length - 1}}}", fullmatch=True))
    pattern = _subscriber_pattern()
    e164 = "+" + plan.country_code + nsn
    forms = [e164, e164[1:], nsn, plan.trunk_prefix + nsn, *(p + e164[1:] for p in plan.international_prefixes)]
    for form in forms:
        if try_e164(form, plan) is not None:
            assert pattern.fullmatch(form), (form, plan)


def test_capacity_is_raised_above_the_stock_limits() -> None:
    switch = configuration(document(load(ROOT)), "switch.conf")
    max_sessions = int(setting(switch, "max-sessions") or 0)
    per_second = int(setting(switch, "sessions-per-second") or 0)
    assert max_sessions > 1000
    assert per_second > 30
    raw = load(ROOT).tree[f"{CONF_DIR}/autoload_configs/switch.conf.xml"].read_text()
    assert "load test" in raw.lower(), "switch.conf.xml explains how to raise the limits for load tests"


def test_environment_overrides_reach_the_configuration() -> None:
    environ = (
        ("IIM_FS_PASSWORD", "s3cret-from-the-vault-0123"),
        ("IIM_FS_MAX_SESSIONS", "20000"),
        ("IIM_FS_SOCKET_PRIMARY", "127.0.0.1:9084"),
    )
    doc = document(load(ROOT, environ))
    assert setting(configuration(doc, "event_socket.conf"), "password") == "s3cret-from-the-vault-0123"
    assert setting(configuration(doc, "switch.conf"), "max-sessions") == "20000"
    targets = {
        a.get("data", "").split()[0] for _, _, a in all_actions(doc) if a.get("application") == "socket"
    }
    assert "127.0.0.1:9084" in targets


def test_without_environment_no_secret_is_guessable() -> None:
    model = load(ROOT)
    for name in ("iim_esl_password", "default_password"):
        assert name in model.asm.exec_sets, f"{name} needs a random exec-set default"
        assert model.asm.variables[name] not in ("", "1234", "ClueCon")
    raw = "".join(p.read_text() for i, p in model.tree.items() if i.endswith(".xml"))
    assert "ClueCon" not in raw
    assert "default_password=1234" not in raw


def test_exec_set_commands_print_an_unguessable_value() -> None:
    """FreeSWITCH runs exec-set commands with system() (/bin/sh -c); run them the same way."""
    model = load(ROOT)
    commands = [
        match["data"].partition("=")[2]
        for file in model.tree.values()
        if file.suffix == ".xml"
        for match in _DIRECTIVE.finditer(file.read_text())
        if match["cmd"].lower() == "exec-set"
    ]
    assert commands
    for command in commands:
        first = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
        second = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
        assert re.fullmatch(r"[0-9a-f]{48}", first), first
        assert first != second


def test_external_profile_only_takes_calls_from_the_core() -> None:
    doc = document(load(ROOT))
    for profile in profiles(doc):
        if not profile.findall("gateways/gateway"):
            continue
        assert setting(profile, "apply-inbound-acl"), "the core-facing profile needs an inbound ACL"
        assert setting(profile, "auth-calls") == "false", (
            "false makes non-core sources a 403, not a challenge"
        )
        assert setting(profile, "disable-register") == "true"
        assert setting(profile, "disable-transfer") == "true"


def test_entrypoint_refuses_a_missing_or_default_password(tmp_path: Path) -> None:
    script = ROOT / "freeswitch-conf" / "docker-entrypoint.sh"
    marker = tmp_path / "started"
    base = {"PATH": "/usr/bin:/bin"}
    cases = [
        ({}, 64),
        ({"IIM_FS_PASSWORD": "ClueCon"}, 64),
        ({"IIM_FS_PASSWORD": 'sixteen-chars-ok"/>'}, 64),
        ({"IIM_FS_PASSWORD": "sixteen-chars-ok", "IIM_FS_SPEAKER_CIDRS": "10.0.0.0/8<"}, 64),
        ({"IIM_FS_PASSWORD": "sixteen-chars-ok", "IIM_FS_SOCKET_PRIMARY": "10.0.0.7:8084"}, 0),
    ]
    for extra, expected in cases:
        marker.unlink(missing_ok=True)
        result = subprocess.run(
            ["sh", str(script), "touch", str(marker)],
            env={**base, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == expected, (extra, result.stderr)
        assert marker.exists() == (expected == 0)


# --------------------------------------------------------------------------- mutations


@dataclasses.dataclass(frozen=True)
class Mutation:
    check: str
    file: str
    old: str
    new: str


MUTATIONS = [
    Mutation(
        "acls",
        "freeswitch-conf/autoload_configs/acl.conf.xml",
        '<list name="speakers"',
        '<list name="devices"',
    ),
    Mutation("acls", "freeswitch-conf/sip_profiles/external.xml", 'value="ims_core"', 'value="ims-core"'),
    Mutation(
        "gateways",
        "freeswitch-conf/sip_profiles/external/ims.xml",
        '<gateway name="ims">',
        '<gateway name="core">',
    ),
    Mutation(
        "gateways",
        "freeswitch-conf/sip_profiles/internal.xml",
        '<profile name="internal">',
        '<profile name="devices">',
    ),
    Mutation(
        "contexts",
        "freeswitch-conf/sip_profiles/internal.xml",
        '<param name="context" value="speakers"/>',
        '<param name="context" value="devices"/>',
    ),
    Mutation(
        "contexts",
        "freeswitch-conf/directory/iim.xml",
        'name="user_context" value="speakers"',
        'name="user_context" value="default"',
    ),
    Mutation(
        "variables",
        "freeswitch-conf/vars.xml",
        'data="iim_secondary=127.0.0.1:8085"',
        'data="iim_second=127.0.0.1:8085"',
    ),
    Mutation("variables", "dialplan/public.xml", 'data="public/*.xml"', 'data="inbound/*.xml"'),
    Mutation(
        "speaker_isolation",
        "dialplan/speakers.xml",
        '<action application="hangup" data="NORMAL_TEMPORARY_FAILURE"/>',
        '<action application="bridge" data="sofia/gateway/ims/${destination_number}"/>',
    ),
    Mutation(
        "speaker_isolation",
        "freeswitch-conf/sip_profiles/internal.xml",
        '<param name="auth-calls" value="true"/>',
        '<param name="auth-calls" value="true"/><param name="apply-register-acl" value="speakers"/>',
    ),
    Mutation(
        "esl",
        "freeswitch-conf/autoload_configs/event_socket.conf.xml",
        'value="127.0.0.1"',
        'value="0.0.0.0"',
    ),
    Mutation(
        "esl",
        "freeswitch-conf/autoload_configs/event_socket.conf.xml",
        'value="$${iim_esl_password}"',
        'value="ClueCon"',
    ),
    Mutation("esl", "freeswitch-conf/autoload_configs/acl.conf.xml", 'cidr="::1/128"', 'cidr="10.0.0.0/8"'),
    Mutation(
        "dockerfile",
        "Dockerfile.fs",
        "COPY dialplan/ /etc/freeswitch/dialplan/",
        "COPY dial-plan/ /etc/freeswitch/dialplan/",
    ),
    Mutation("dockerfile", "Dockerfile.fs", "EXPOSE 5060/udp", "EXPOSE 8021/tcp 5060/udp"),
    Mutation("dockerfile", "Dockerfile.fs", "USER freeswitch", "USER root"),
    Mutation(
        "sockets",
        "dialplan/public/50_iim_subscriber.xml",
        '<action application="set" data="socket_resume=true"/>',
        "",
    ),
    Mutation(
        "sockets",
        "dialplan/speakers.xml",
        'data="$${iim_primary} async full"',
        'data="$${iim_primary} async"',
    ),
    Mutation(
        "subscriber_fallback",
        "dialplan/public/50_iim_subscriber.xml",
        '<action application="bridge" data="sofia/gateway/ims/${destination_number}"/>',
        "",
    ),
    Mutation(
        "subscriber_fallback",
        "dialplan/public/50_iim_subscriber.xml",
        '<action application="set" data="continue_on_fail=false"/>',
        "",
    ),
    Mutation("modules", "freeswitch-conf/autoload_configs/modules.conf.xml", '<load module="mod_hash"/>', ""),
    Mutation("modules", "Dockerfile.fs", "freeswitch-mod-sofia \\", "\\"),
    Mutation(
        "env_contract",
        "freeswitch-conf/docker-entrypoint.sh",
        "check IIM_FS_SPEAKER_CIDRS '[0-9A-Fa-f.:/,]+'\n",
        "",
    ),
    Mutation(
        "iim_consistency",
        "freeswitch-conf/vars.xml",
        'data="iim_primary=127.0.0.1:8084"',
        'data="iim_primary=127.0.0.1:9999"',
    ),
    Mutation(
        "preprocessor_hazards",
        "freeswitch-conf/vars.xml",
        "<!-- Identity of this switch: the SIP domain speakers register to. -->",
        '<!-- <X-PRE-PROCESS cmd="set" data="domain=example.org"/> -->',
    ),
    Mutation(
        "preprocessor_hazards",
        "freeswitch-conf/vars.xml",
        "<!-- Identity of this switch: the SIP domain speakers register to. -->",
        "<!-- Identity of this switch; X-PRE-PROCESS lines below set it. -->",
    ),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: f"{m.check}:{Path(m.file).name}:{m.new[:24]}")
def test_resolvers_notice_a_broken_reference(mutation: Mutation, tmp_path: Path) -> None:
    for name in ("freeswitch-conf", "dialplan"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy2(ROOT / "Dockerfile.fs", tmp_path / "Dockerfile.fs")
    target = tmp_path / mutation.file
    text = target.read_text()
    assert text.count(mutation.old) == 1, f"mutation anchor must occur once in {mutation.file}"
    target.write_text(text.replace(mutation.old, mutation.new))
    assert CHECKS[mutation.check](tmp_path) != []
