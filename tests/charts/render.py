"""Renders a chart with the Helm SDK and prints its Kubernetes objects as a JSON list.

    .venv/bin/python tests/charts/render.py CHART_DIR RELEASE NAMESPACE VALUES_JSON

The end-to-end test of the filter chart (tests/tests/chart.rs) takes its EnvoyFilters from here.
"""

import json
import sys

import helm_python
import yaml


def main():
    chart, release, namespace, values = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    with helm_python.Chart.load(chart) as loaded:
        loaded.validate_schema(values)
        manifests = loaded.render(values=values, name=release, namespace=namespace)
    objects = [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    json.dump(objects, sys.stdout)


if __name__ == "__main__":
    main()
