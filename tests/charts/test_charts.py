"""Chart tests: every chart, with its defaults and every ci/*-values.yaml, renders and lints
(strict) with Helm v4 (PyPI helm-python-sdk, no helm binary); every rendered Kubernetes object
validates against the Kubernetes 1.30 schemas (kubernetes-validate --strict); every EnvoyFilter
validates against Istio's CRD schema (../shared/schemas/istio-crds.yaml, or the copy the test
is pointed at by PI_ISTIO_CRDS); bad values are refused with a message naming the key.

Run by `cargo xtask test`; on its own: .venv/bin/python -m pytest tests/charts
"""

import copy
import json
import os
import pathlib

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.30.0"
SHA = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

# chart directory -> (release name, namespace, values every render needs)
CHARTS = {
    "manifests/charts/packet-inspector": ("packet-inspector-1-aggregator", "istio-system", {}),
    "manifests/charts/packet-inspector-1-filter": ("capture-bookinfo", "bookinfo", {"module": {"sha256": SHA}}),
    # The release names of the README's install commands.
    "samples/packet-inspector-1-analysis-emulator": ("pi1-analysis-emulator", "analysis-emulator", {}),
}


def scenarios():
    for chart, (release, namespace, base) in CHARTS.items():
        yield pytest.param(chart, release, namespace, base, id=f"{pathlib.Path(chart).name}:defaults")
        for values_file in sorted((ROOT / chart / "ci").glob("*-values.yaml")):
            values = yaml.safe_load(values_file.read_text()) or {}
            yield pytest.param(chart, release, namespace, values, id=f"{pathlib.Path(chart).name}:{values_file.name}")


def render(chart, release, namespace, values):
    with helm_python.Chart.load(str(ROOT / chart)) as loaded:
        loaded.validate_schema(values)
        manifests = loaded.render(values=values, name=release, namespace=namespace)
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests, objects


def istio_crd_schema(kind_plural):
    path = pathlib.Path(os.environ.get("PI_ISTIO_CRDS", ROOT.parent / "shared" / "schemas" / "istio-crds.yaml"))
    if not path.is_file():
        pytest.fail(f"Istio CRDs not found at {path} (set PI_ISTIO_CRDS)")
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition" and doc["metadata"]["name"] == kind_plural:
            version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1alpha3")
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            # Strict below spec; apiVersion, kind and metadata are the API server's to check.
            schema["properties"]["spec"] = strict_structural(schema["properties"]["spec"])
            return {k: v for k, v in schema.items() if k != "x-kubernetes-validations"}
    pytest.fail(f"{kind_plural} not in {path}")


def strict_structural(schema):
    """The CRD's structural schema as a strict JSON Schema: objects that declare properties and
    do not preserve unknown fields refuse others (what `kubectl --validate=strict` reports, where
    the API server would silently prune). CEL rules (x-kubernetes-validations) are not checked."""
    if isinstance(schema, list):
        return [strict_structural(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: strict_structural(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict.setdefault("additionalProperties", False)
    return strict


@pytest.mark.parametrize("chart,release,namespace,values", list(scenarios()))
def test_renders_lints_and_validates(chart, release, namespace, values):
    merged = copy.deepcopy(values)
    for key, value in CHARTS[chart][2].items():
        merged.setdefault(key, value)
    manifests, objects = render(chart, release, namespace, merged)
    assert objects, "nothing rendered"
    assert any(path.endswith("NOTES.txt") and text.strip() for path, text in manifests.items()), "NOTES.txt says what was installed"

    lint = helm_python.lint(str(ROOT / chart), merged, strict=True, kube_version=f"v{KUBE_VERSION}", namespace=namespace)
    problems = [m for m in lint["messages"] if m["severity"] >= 2] + list(lint["errors"])
    assert not problems, problems

    envoy_filter_schema = istio_crd_schema("envoyfilters.networking.istio.io")
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert len(obj["metadata"]["name"]) <= 63, name
        if obj["kind"] == "EnvoyFilter":
            jsonschema.validate(obj, envoy_filter_schema)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_envoy_filter_schema_refuses_what_istio_would():
    schema = istio_crd_schema("envoyfilters.networking.istio.io")
    _, objects = render("manifests/charts/packet-inspector-1-filter", "c", "ns", {"module": {"sha256": SHA}})
    good = objects[0]
    jsonschema.validate(good, schema)
    for path, value in [(("spec", "bogusField"), 1), (("spec", "configPatches", 0, "applyTo"), "BOGUS")]:
        bad = copy.deepcopy(good)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def refusal(chart, values):
    with helm_python.Chart.load(str(ROOT / chart)) as loaded:
        with pytest.raises(helm_python.HelmValuesError) as refused:
            loaded.validate_schema(values)
    return str(refused.value)


@pytest.mark.parametrize(
    "chart,values,mentions",
    [
        ("manifests/charts/packet-inspector", {"service": {"port": 70000}}, "port"),
        ("manifests/charts/packet-inspector", {"service": {"port": "15500"}}, "port"),
        ("manifests/charts/packet-inspector", {"servce": {}}, "servce"),
        ("manifests/charts/packet-inspector", {"analysis": {"address": "no-port"}}, "address"),
        ("manifests/charts/packet-inspector", {"analysis": {"inlineBodies": "yes"}}, "inlineBodies"),
        ("manifests/charts/packet-inspector", {"service": {"ipFamilies": ["IPv5"]}}, "ipFamilies"),
        ("manifests/charts/packet-inspector-1-filter", {}, "sha256"),
        ("manifests/charts/packet-inspector-1-filter", {"module": {"sha256": "xyz"}}, "sha256"),
        ("manifests/charts/packet-inspector-1-filter", {"module": {"sha256": SHA}, "diameterCapture": {"port": 0}}, "port"),
        ("manifests/charts/packet-inspector-1-filter", {"module": {"sha256": SHA}, "failurePolicy": "FAIL_CLOSED"}, "failurePolicy"),
        ("manifests/charts/packet-inspector-1-filter", {"module": {"sha256": SHA}, "httpCapture": {"maxBodyBytes": -1}}, "maxBodyBytes"),
        ("manifests/charts/packet-inspector-1-filter", {"httpCapture": {"module": "native"}}, "sha256"),
        ("manifests/charts/packet-inspector-1-filter", {"httpCapture": {"module": "native"}, "nativeModule": {"sha256": SHA}, "diameterCapture": {"enabled": True}}, "/module"),
        ("manifests/charts/packet-inspector-1-filter", {"module": {"sha256": SHA}, "httpCapture": {"module": "so"}}, "module"),
        ("samples/packet-inspector-1-analysis-emulator", {"port": "21000"}, "port"),
        ("samples/packet-inspector-1-analysis-emulator", {"outputDir": "tmp"}, "outputDir"),
    ],
)
def test_bad_values_are_refused_readably(chart, values, mentions):
    message = refusal(chart, values)
    assert mentions in message, message


def test_default_names_meet():
    """The aggregator chart's defaults dial the emulator installed as the README says, and the
    filter chart's defaults dial the aggregator installed as the README says."""
    _, emulator = render("samples/packet-inspector-1-analysis-emulator", "pi1-analysis-emulator", "analysis-emulator", {})
    service = next(o for o in emulator if o["kind"] == "Service")
    account = next(o for o in emulator if o["kind"] == "ServiceAccount")
    assert service["metadata"]["name"] == account["metadata"]["name"] == "packet-inspector-1-analysis-emulator"
    port = service["spec"]["ports"][0]["port"]
    _, aggregator = render("manifests/charts/packet-inspector", "packet-inspector-1-aggregator", "istio-system", {})
    args = next(o for o in aggregator if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--analysis-address=packet-inspector-1-analysis-emulator.analysis-emulator.svc.cluster.local:{port}" in args
    aggregator_service = next(o for o in aggregator if o["kind"] == "Service")
    _, filters = render("manifests/charts/packet-inspector-1-filter", "capture", "bookinfo", {"module": {"sha256": SHA}})
    clusters = next(o for o in filters if o["metadata"]["name"] == "capture-clusters")
    address = clusters["spec"]["configPatches"][0]["patch"]["value"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {
        "address": f"{aggregator_service['metadata']['name']}.istio-system.svc.cluster.local",
        "port_value": aggregator_service["spec"]["ports"][0]["port"],
    }


def test_inline_bodies_is_a_flag_of_the_aggregator():
    """Bodies go as slices of the packets unless the values ask for them inline."""
    def args(values):
        _, objects = render("manifests/charts/packet-inspector", "packet-inspector-1-aggregator", "istio-system", values)
        return next(o for o in objects if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--inline-bodies" not in args({})
    assert "--inline-bodies" in args({"analysis": {"inlineBodies": True}})


def test_filter_instance_scopes():
    """Namespace-wide without labels, labelled pods with them; Diameter never at gateways."""
    chart = "manifests/charts/packet-inspector-1-filter"
    _, objects = render(chart, "capture", "bookinfo", {"module": {"sha256": SHA}})
    assert all("workloadSelector" not in o["spec"] for o in objects)
    assert {p["match"]["context"] for o in objects if o["metadata"]["name"] == "capture-http" for p in o["spec"]["configPatches"]} == {
        "SIDECAR_INBOUND",
        "SIDECAR_OUTBOUND",
    }
    _, objects = render(chart, "capture", "bookinfo", {"module": {"sha256": SHA}, "workloadSelector": {"labels": {"app": "x"}}})
    assert all(o["spec"]["workloadSelector"] == {"labels": {"app": "x"}} for o in objects)
    _, objects = render(chart, "capture", "bookinfo", {"module": {"sha256": SHA}, "gateway": {"enabled": True}, "diameterCapture": {"enabled": True}})
    assert [o["metadata"]["name"] for o in objects if "diameter" in o["metadata"]["name"]] == []
    contexts = {p["match"]["context"] for o in objects for p in o["spec"]["configPatches"]}
    assert contexts == {"GATEWAY"}


def test_native_http_capture_needs_no_wasm():
    """HTTP by the native capture: a dynamic-module filter fetched from the aggregator (pinned
    by its sha256, never unloaded), configured to dial the aggregator with the sidecar's SDS
    certificate; no Wasm module, aggregator cluster or Wasm sha256 unless Diameter needs them."""
    chart = "manifests/charts/packet-inspector-1-filter"
    native_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    values = {"nativeModule": {"sha256": native_sha}, "httpCapture": {"module": "native"}, "aggregator": {"subjectAltNames": ["agg.istio-system.svc"]}}
    _, objects = render(chart, "capture", "bookinfo", values)
    http = next(o for o in objects if o["metadata"]["name"] == "capture-http")
    filters = [p["patch"]["value"] for p in http["spec"]["configPatches"]]
    assert len(filters) == 2
    for value in filters:
        typed = value["typed_config"]
        assert typed["@type"] == "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
        module = typed["dynamic_module_config"]
        assert module["do_not_close"] is True
        assert module["module"]["remote"]["sha256"] == native_sha
        assert module["module"]["remote"]["http_uri"]["uri"] == "http://packet-inspector-1-aggregator.istio-system.svc.cluster.local:15501/native-capture.so"
        assert module["module"]["remote"]["http_uri"]["cluster"] == "packet_inspector_native_module_capture"
        config = json.loads(typed["filter_config"]["value"])
        assert config["aggregator"] == {
            "address": "packet-inspector-1-aggregator.istio-system.svc.cluster.local:15500",
            "serverName": "agg.istio-system.svc",
            "sdsSocket": "/var/run/secrets/workload-spiffe-uds/socket",
        }
        assert config["role"] == "auto" and config["maxBodyBytes"] == 65536 and "cluster" not in config
        assert config["podLabelsFile"] == "/etc/istio/pod/labels"
    clusters = next(o for o in objects if o["metadata"]["name"] == "capture-clusters")
    assert [p["patch"]["value"]["name"] for p in clusters["spec"]["configPatches"]] == ["packet_inspector_native_module_capture"]
    # Without identities to check for, any certificate of the mesh CA (as the Wasm filter's cluster).
    _, objects = render(chart, "capture", "bookinfo", {**values, "aggregator": {}})
    http = next(o for o in objects if o["metadata"]["name"] == "capture-http")
    config = json.loads(http["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["filter_config"]["value"])
    assert config["aggregator"]["serverName"] == ""
    _, objects = render(chart, "capture", "bookinfo", {**values, "module": {"sha256": SHA}, "diameterCapture": {"enabled": True}})
    clusters = next(o for o in objects if o["metadata"]["name"] == "capture-clusters")
    assert [p["patch"]["value"]["name"] for p in clusters["spec"]["configPatches"]] == [
        "packet_inspector_capture",
        "packet_inspector_module_capture",
        "packet_inspector_native_module_capture",
    ]


def test_a_sha256_of_digits_stays_a_string():
    """A digest YAML would read as a number (all digits) reaches Envoy as the string it is."""
    digits = "1" * 64
    values = {"module": {"sha256": digits}, "nativeModule": {"sha256": digits}, "diameterCapture": {"enabled": True}}
    for module in ["wasm", "native"]:
        _, objects = render("manifests/charts/packet-inspector-1-filter", "c", "ns", {**values, "httpCapture": {"module": module}})
        found = []

        def walk(node):
            if isinstance(node, dict):
                if "sha256" in node:
                    found.append(node["sha256"])
                for child in node.values():
                    walk(child)
            elif isinstance(node, list):
                for child in node:
                    walk(child)

        walk(objects)
        assert found and all(sha == digits for sha in found), (module, found)
