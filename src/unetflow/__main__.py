from unetflow.cli import main

main()
