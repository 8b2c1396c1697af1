# Source this on a GPU host with no network (the lent device): installs carried wheels (.whl/) and wanrt itself into
# /tmp/site without touching the system Python.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WANRT_WHEELS:-.whl}/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . 2>&1 | grep -v "root"; ls /tmp/site/wanrt
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
