"""runtime.set_xla_flags: our CPU flags added to $XLA_FLAGS, the user's own values kept."""

from stable_alignment_jax import runtime


def test_flags_are_added_and_a_users_value_wins():
  env = {}
  runtime.set_xla_flags(env)
  assert env["XLA_FLAGS"].split() == list(runtime.CPU_XLA_FLAGS)
  name = runtime.CPU_XLA_FLAGS[0].split("=")[0]
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {name}=false"}
  runtime.set_xla_flags(env)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {name}=false"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  runtime.set_xla_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      *runtime.CPU_XLA_FLAGS]


def test_importing_the_package_set_them_in_this_process():
  import os
  assert set(runtime.CPU_XLA_FLAGS) <= set(os.environ["XLA_FLAGS"].split())
