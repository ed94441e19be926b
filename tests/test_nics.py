"""Which interfaces Gloo uses between ranks (training/distributed.py: decide_nics), as a pure
function of what the driver and the ranks' hosts report; the multi-host tests run it for real."""

import pytest

from deepspark.config import ConfigError
from training.distributed import HostInterfaces, decide_nics

DRIVER = {"lo": ["127.0.0.1"], "eth0": ["198.18.0.10"], "data0": ["198.18.1.10"]}
W1 = HostInterfaces("198.18.0.21", "w1", {"lo": ["127.0.0.1"], "eth0": ["198.18.0.21"], "data0": ["198.18.1.21"]},
                    "198.18.1.21")
W2 = HostInterfaces("198.18.0.22", "w2", {"lo": ["127.0.0.1"], "ens5": ["198.18.0.22"], "data0": ["198.18.1.22"]},
                    "198.18.1.22")


def test_a_local_master_uses_loopback_unless_told_otherwise():
    assert decide_nics(None, True, "127.0.0.1", DRIVER, []) == ["lo"]
    assert decide_nics(["data0"], True, "127.0.0.1", DRIVER, []) == ["data0"]


def test_unset_takes_the_driver_interface_that_holds_its_advertised_address():
    w2_with_eth0 = HostInterfaces("198.18.0.22", "w2", {**W2.addresses, "eth0": ["198.18.0.22"]}, "198.18.1.22")
    assert decide_nics(None, False, "198.18.0.10", DRIVER, [W1, w2_with_eth0]) == ["eth0"]
    assert decide_nics(None, False, "198.18.1.10", DRIVER, [W1, W2]) == ["data0"]


def test_a_host_without_the_interface_fails_naming_the_key_the_host_and_what_is_shared():
    with pytest.raises(ConfigError) as err:
        decide_nics(None, False, "198.18.0.10", DRIVER, [W1, W2])
    message = str(err.value)
    assert message.startswith("horovod.nics") and "'eth0' is missing on executor host 198.18.0.22" in message
    assert "ens5 198.18.0.22" in message and "every host has: data0" in message
    with pytest.raises(ConfigError, match="horovod.nics: the driver has no IPv4 interface 'ib0'"):
        decide_nics(["ib0"], False, "198.18.0.10", DRIVER, [W1, W2])


def test_ranks_on_several_hosts_refuse_a_host_name_that_resolves_to_loopback():
    debian_default = HostInterfaces(W2.host, W2.host_hash, W2.addresses, "127.0.1.1")
    with pytest.raises(ConfigError, match=r"on 198.18.0.22 the host name resolves to 127.0.1.1.*data0 address"):
        decide_nics(["data0"], False, "198.18.0.10", DRIVER, [W1, debian_default])
    # One host (a single-machine standalone cluster): loopback names are fine.
    same_host = [HostInterfaces("127.0.0.1", "one", {"lo": ["127.0.0.1"]}, "127.0.1.1")] * 2
    assert decide_nics(["lo"], False, "127.0.0.1", {"lo": ["127.0.0.1"]}, same_host) == ["lo"]


def test_a_driver_address_on_no_interface_is_named():
    with pytest.raises(ConfigError, match="no interface of the driver holds spark.driver.host 198.19.9.9"):
        decide_nics(None, False, "198.19.9.9", DRIVER, [W1])
