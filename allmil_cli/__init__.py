"""allmil: screening blood-smear fields for Acute Lymphoblastic Leukemia (multiple-instance learning).

Library use (no torch needed)::

    from allmil_cli.io.discover import discover_patients
    from allmil_cli.stages.models import load_models
    from allmil_cli.pipeline import Pipeline

    patients, _ = discover_patients(Path("patients"))
    pipeline = Pipeline(load_models())
    for result in pipeline.run(patients):
        print(result.patient, result.call, result.p_all)
"""

__version__ = "0.4.0"
