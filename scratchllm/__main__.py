from scratchllm.cli import main

main()
