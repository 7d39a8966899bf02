"""The README's measured tables are exactly what benchmarks/results/*.json say."""

from benchmarks.tables import BEGIN, END, README, render


def test_readme_tables_match_results_json():
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert block == render().strip(), "run: python -m benchmarks.tables --readme"
