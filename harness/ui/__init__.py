"""``bench serve``: the estimator and the planner as a local web page (Gradio; the optional ``[ui]`` extra).

``form`` turns the page's inputs into the ``bench`` command lines they stand for (from the one flag table,
``estimators/setup.py: CLI``) and parses them with ``bench``'s own parser; ``views`` answers a form (tables, the
stacked-bar chart, the recommendation, the commands and the ``TrainingArguments`` snippet) without Gradio;
``chart`` draws the chart as SVG; ``results_view`` reads an uploaded results file; ``app`` lays the page out.
"""
