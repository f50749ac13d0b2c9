from services.security.service import main

main()
