"""envmgr behind Metaflow's @conda, @pypi, @conda_base, @pypi_base and --environment=conda/pypi.

Plugins named like Metaflow's own override them (Metaflow takes the latest entry per name).
"""

STEP_DECORATORS_DESC = [
    ("conda", ".envmgr_decorators.CondaStepDecorator"),
    ("pypi", ".envmgr_decorators.PyPIStepDecorator"),
    ("named_env", ".envmgr_decorators.NamedEnvStepDecorator"),
]
FLOW_DECORATORS_DESC = [
    ("conda_base", ".envmgr_decorators.CondaFlowDecorator"),
    ("pypi_base", ".envmgr_decorators.PyPIFlowDecorator"),
    ("named_env_base", ".envmgr_decorators.NamedEnvFlowDecorator"),
]
CLIS_DESC = [("environment", ".envmgr_cli.cli")]
ENVIRONMENTS_DESC = [
    ("conda", ".envmgr_environment.CondaEnvironment"),
    ("pypi", ".envmgr_environment.PypiEnvironment"),
]
