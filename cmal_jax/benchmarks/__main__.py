from cmal_jax.benchmarks.run import main

if __name__ == '__main__':
  main()
