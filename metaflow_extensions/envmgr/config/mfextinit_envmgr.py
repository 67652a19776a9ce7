"""Configuration of the envmgr Metaflow extension (read from METAFLOW_* as usual)."""

from metaflow.metaflow_config_funcs import from_conf

#: Where envmgr keeps locks and archives; default: ENVMGR_STORE, else <S3 datastore>/envmgr,
#: else the local store.
ENVMGR_STORE = from_conf("ENVMGR_STORE", None)
