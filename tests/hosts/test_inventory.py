"""Hosts files and Ansible inventories (INI and YAML) as the source of host names."""

from __future__ import annotations

import os
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemuca.errors import EXIT_INVALID_INPUT, InvalidInput
from qemuca.hosts.inventory import InventoryHost, read_hosts_file, read_inventory

INI = """\
# ungrouped hosts come before any section
bastion ansible_host=192.0.2.1
lone:2201

[web]
web[01:03].example ansible_user=www
edge-[a:c].example

[db]
db1 ansible_host="10.9.0.1" ansible_port=5432
; a comment line
db2 ansible_user='db admin'   # an inline comment

[cluster:children]
web
db

[cluster:vars]
ansible_user=cluster
ansible_port = 2222

[all:vars]
ansible_user=everyone
"""
YAML = """\
all:
  hosts:
    bastion:
      ansible_host: 192.0.2.1
    lone:2201:
  vars:
    ansible_user: everyone
  children:
    cluster:
      vars:
        ansible_user: cluster
        ansible_port: "2222"
      children:
        web:
          hosts:
            web[01:03].example:
              ansible_user: www
            edge-[a:c].example:
        db:
          hosts:
            db1: {ansible_host: 10.9.0.1, ansible_port: 5432}
            db2: {ansible_user: db admin}
"""

EXPECTED = [
    InventoryHost("bastion", ssh_host="192.0.2.1", ssh_user="everyone"),
    InventoryHost("lone", ssh_port=2201, ssh_user="everyone"),
    InventoryHost("web01.example", ssh_port=2222, ssh_user="www"),
    InventoryHost("web02.example", ssh_port=2222, ssh_user="www"),
    InventoryHost("web03.example", ssh_port=2222, ssh_user="www"),
    InventoryHost("edge-a.example", ssh_port=2222, ssh_user="cluster"),
    InventoryHost("edge-b.example", ssh_port=2222, ssh_user="cluster"),
    InventoryHost("edge-c.example", ssh_port=2222, ssh_user="cluster"),
    InventoryHost("db1", ssh_host="10.9.0.1", ssh_port=5432, ssh_user="cluster"),
    InventoryHost("db2", ssh_port=2222, ssh_user="db admin"),
]


def write(tmp_path, text, name="hosts"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def names(path, limit=None):
    return [h.name for h in read_inventory(path, limit)]


@pytest.mark.parametrize("text, name", [(INI, "hosts"), (INI, "hosts.ini"),
                                        (YAML, "hosts.yml"), (YAML, "hosts.yaml"),
                                        (YAML, "hosts")],  # YAML found by content too
                         ids=["ini", "ini-ext", "yml", "yaml", "yaml-by-content"])
def test_ini_and_yaml_read_the_same_inventory(tmp_path, text, name):
    assert read_inventory(write(tmp_path, text, name)) == EXPECTED


@pytest.mark.parametrize("text, name", [(INI, "hosts"), (YAML, "hosts.yml")], ids=["ini", "yaml"])
@pytest.mark.parametrize("limit, expected", [
    ("all", [h.name for h in EXPECTED]),
    ("db", ["db1", "db2"]),
    ("cluster", [h.name for h in EXPECTED[2:]]),          # children, recursively
    ("ungrouped", ["bastion", "lone"]),
    ("db2", ["db2"]),
    ("db,bastion", ["db1", "db2", "bastion"]),            # union, in the order asked
    ("db:web01.example:db1", ["db1", "db2", "web01.example"]),
    (" web , web ", ["web01.example", "web02.example", "web03.example",
                     "edge-a.example", "edge-b.example", "edge-c.example"]),
])
def test_limit_selects_groups_and_hosts(tmp_path, text, name, limit, expected):
    assert names(write(tmp_path, text, name), limit) == expected


@pytest.mark.parametrize("limit", ["nope", "db,nope", "db:nope", ",", "web*"])
def test_limit_naming_nothing_known_is_refused(tmp_path, limit):
    path = write(tmp_path, INI)
    with pytest.raises(InvalidInput, match="limit"):
        read_inventory(path, limit)


def test_ranges_with_stride_padding_letters_and_several_brackets(tmp_path):
    path = write(tmp_path, "n[0:10:5]\np[08:10]\nq[:1]\nr[x:z:2]-[1:2]\n[a]\ns[y:B]\n")
    assert names(path) == (["n0", "n5", "n10", "p08", "p09", "p10", "q0", "q1",
                            "rx-1", "rx-2", "rz-1", "rz-2"]
                           + ["sy", "sz", "sA", "sB"])  # Ansible's letter order: a-z then A-Z


def test_precedence_host_then_child_group_then_parent_then_all(tmp_path):
    path = write(tmp_path, """\
        h1 ansible_ssh_user=hostold
        [all:vars]
        ansible_port=1
        ansible_user=top
        ansible_host=shared.example
        [parent:children]
        child
        [parent:vars]
        ansible_port=2
        ansible_user=parent
        [child:vars]
        ansible_port=3
        [child]
        h1 ansible_user=host
        h2:4 ansible_port=5
        h3:6
        [aa]
        h4 ansible_ssh_port=7 ansible_port=8
        [bb]
        h4
        [aa:vars]
        ansible_user=from_aa
        [bb:vars]
        ansible_user=from_bb
    """.replace("        ", ""))
    hosts = {h.name: h for h in read_inventory(path)}
    # host var beats every group var; ansible_user beats its alias at the same level
    assert hosts["h1"] == InventoryHost("h1", "shared.example", 3, "host")
    # an inline ansible_port beats the pattern's :port, which beats group vars
    assert hosts["h2"].ssh_port == 5 and hosts["h3"].ssh_port == 6
    # groups at one depth apply in name order (Ansible's rule): bb after aa
    assert hosts["h4"] == InventoryHost("h4", "shared.example", 8, "from_bb")


def test_yaml_aliases_and_host_var_precedence(tmp_path):
    path = write(tmp_path, textwrap.dedent("""\
        all:
          vars: {ansible_ssh_user: legacy, ansible_ssh_port: 2000}
          children:
            a:
              vars: {ansible_ssh_host: a.example}
              hosts:
                x: {ansible_user: "01"}
                y:
                "[2001:db8::1]:2022":
        """), "inv.yaml")
    assert read_inventory(path) == [
        InventoryHost("x", "a.example", 2000, "01"),
        InventoryHost("y", "a.example", 2000, "legacy"),
        InventoryHost("2001:db8::1", "a.example", 2022, "legacy"),
    ]


def test_duplicates_are_kept_once_in_first_seen_order_with_merged_vars(tmp_path):
    ini = write(tmp_path, "b\na\n[g1]\nc ansible_port=22\na\n[g2]\nc ansible_user=u\nb\n[g3]\nc\n")
    assert read_inventory(ini) == [InventoryHost("b"), InventoryHost("a"),
                                   InventoryHost("c", ssh_port=22, ssh_user="u")]
    assert names(ini, "g2,g1,c") == ["b", "c", "a"]
    yml = write(tmp_path, "g1:\n  hosts: {c: {ansible_port: 22}, a:}\n"
                          "g2:\n  hosts: c\n  children: {g1:}\n", "dup.yml")
    assert read_inventory(yml) == [InventoryHost("c", ssh_port=22), InventoryHost("a")]
    assert names(yml, "g2") == ["c", "a"]


def test_children_may_be_declared_after_use(tmp_path):
    path = write(tmp_path, "[top:children]\nlater\n[top:vars]\nansible_user=t\n[later]\nh\n")
    assert read_inventory(path, "top") == [InventoryHost("h", ssh_user="t")]


def test_empty_and_comment_only_inventories_have_no_hosts(tmp_path):
    assert read_inventory(write(tmp_path, "")) == []
    assert read_inventory(write(tmp_path, "# only \xff\n; comments \xfe\n".encode("latin-1"))) == []
    assert read_inventory(write(tmp_path, "all:\n", "e.yml")) == []


GARBAGE = [
    ("binary", b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary"),
    ("not utf-8", b"web1\nweb\xff2\n", ":2: not UTF-8"),
    ("yaml not utf-8", b"all:\n  hosts: {h\xff: }\n", ":2: not UTF-8"),
    ("open bracket", "web[01:03.example\n", ":1: unbalanced"),
    ("close bracket", "web01:03].example\n", ":1: unbalanced"),
    ("nested bracket", "w[[1:2]]\n", ":1: unbalanced"),
    ("range mixes", "w[a:5]\n", ":1: bad range"),
    ("range reversed", "w[3:1]\n", "start is after end"),
    ("range padding", "w[01:5]\n", "same length"),
    ("range no end", "w[1:]\n", ":1: bad range"),
    ("range one bound", "w[1]\n", ":1: bad range"),
    ("range zero step", "w[1:5:0]\n", "step"),
    ("range huge", "w[0:99999999]\n", "too many"),
    ("ranges multiply", "w[0:999][0:999]\n", "too many"),
    ("section type", "[web:hosts2]\nh\n", ":1: unknown section type"),
    ("section spaces", "[web servers]\n", ":1: invalid section header"),
    ("host var no =", "\n\nh1 ansible_user\n", ":3: expected key=value"),
    ("host var no key", "h1 =x\n", ":1: expected key=value"),
    ("host var bad key", "h1 a-b=x\n", ":1: expected key=value"),
    ("unclosed quote", "h1 ansible_user='x\n", ":1: No closing quotation"),
    ("vars no =", "[g]\nh\n[g:vars]\njust words\n", ":4: expected key=value"),
    ("children bad name", "[g:children]\na b\n", ":2: expected a group name"),
    ("undeclared child", "[g:children]\nghost\n", ":2: group 'ghost' is never declared"),
    ("vars of nothing", "[ghost:vars]\na=1\n", ":1: group 'ghost' is never declared"),
    ("loop", "[a:children]\nb\n[b:children]\na\n", ":4: group 'a' as a child of 'b' makes a loop"),
    ("all as child", "[a:children]\nall\n", "makes a loop"),
    ("empty host", "'' a=1\n", "empty host name"),
    ("port trailing colon", "[g]\nh1:\n", "ends with ':'"),
    ("port too big", "h1:70000\n", "ansible_port='70000' is not a port number"),
    ("var port words", "h1 ansible_port=ssh\n", "ansible_port='ssh' is not a port number"),
    ("var port zero", "[g:vars]\nansible_port=0\n[g]\nh\n", "not a port number"),
    ("var port bool", "all:\n  hosts: {h: {ansible_port: true}}\n", "not a port number"),
    ("var user list", "all:\n  hosts: {h: {ansible_user: [a]}}\n", "is not a name"),
    ("jinja", "h ansible_host='{{ inventory_hostname }}.lan'\n", "Jinja"),
    ("yaml list", "---\n- all\n- web\n", "mapping of groups"),
    ("yaml scalar", "--- just text\n", "mapping of groups"),
    ("yaml empty", b"---\n", "mapping of groups"),
    ("yaml syntax", "all:\n  hosts: [unclosed\n", "invalid YAML"),
    ("yaml tabs", "all:\n\thosts:\n", "invalid YAML"),
    ("yaml group list", "all:\n  children:\n    web: [a, b]\n", "group 'web': expected a mapping"),
    ("yaml hosts list", "all:\n  hosts: [a, b]\n", "hosts must be a mapping"),
    ("yaml typo", "all:\n  host: {a: }\n", "unexpected key 'host'"),
    ("yaml host vars", "all:\n  hosts: {a: 3}\n", "vars must be a mapping"),
    ("yaml loop", "all:\n  children:\n    a: &A\n      children: {a: *A}\n", "makes a loop"),
    ("yaml range", "all:\n  hosts: {'w[1:3': }\n", "unbalanced"),
    ("yaml name", "all:\n  hosts: {[1, 2]: }\n", "invalid YAML|is not text"),
    ("plugin config", "plugin: aws_ec2\nregions: [x]\n", "plugin configuration"),
]


@pytest.mark.parametrize("text, expect", [g[1:] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_is_invalid_input_with_one_line_naming_the_file(tmp_path, text, expect):
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as caught:
        read_inventory(path)
    message = str(caught.value)
    assert path in message and "\n" not in message
    assert any(part in message for part in expect.split("|")), message
    assert caught.value.exit_code == EXIT_INVALID_INPUT


def test_unreadable_paths_are_invalid_input(tmp_path):
    for path, reason in [(str(tmp_path), "Is a directory"), (str(tmp_path / "none"), "No such file")]:
        with pytest.raises(InvalidInput, match=f"cannot read inventory {path}: {reason}"):
            read_inventory(path)


ini_chars = "[]:=#;'\"\\ \t\n{}-.,*!0129abAZ\xe9"
ini_tokens = st.sampled_from(list(ini_chars) + ["all", ":vars", ":children", "ansible_port=", "[a:c]"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.text(ini_chars, max_size=80),
                         st.lists(ini_tokens, max_size=40).map("".join),
                         st.text(max_size=80), st.binary(max_size=80)),
       limit=st.sampled_from([None, "all", "a", "a:b,all"]))
def test_fuzzed_inventories_raise_nothing_but_invalid_input(content, limit):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "inventory")
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            hosts = read_inventory(path, limit)
        except InvalidInput as e:
            assert "\n" not in str(e)
        else:
            assert all(isinstance(h, InventoryHost) and h.name for h in hosts)
            assert len({h.name for h in hosts}) == len(hosts)


def test_read_hosts_file_is_unchanged(tmp_path):
    path = write(tmp_path, "a.example\n\n  b.example  # db\n# c.example\na.example\n")
    assert read_hosts_file(path) == ["a.example", "b.example", "a.example"]
    with pytest.raises(InvalidInput, match="is not UTF-8 text"):
        read_hosts_file(write(tmp_path, b"\xff\n", "bin"))
    with pytest.raises(InvalidInput, match="cannot read hosts file .*: No such file"):
        read_hosts_file(str(tmp_path / "missing"))
